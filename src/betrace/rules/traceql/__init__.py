"""TraceQL, as Grafana Tempo defines it, evaluated per trace over span batches."""
