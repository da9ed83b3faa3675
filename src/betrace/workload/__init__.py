"""Synthetic OTLP workloads with a known ground truth, for produce, demo and benchmarks."""
