"""User-facing read APIs: signals on Kafka, traces and signals in storage."""
