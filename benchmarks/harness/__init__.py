"""Support modules of benchmarks/loadtest.py and benchmarks/bench_tenants.py."""
