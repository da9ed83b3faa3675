"""Operating BeTrace: Prometheus export, consumer-lag monitor, health checks and their web routes."""
