"""Tiny local towers and the offline demo data, for tests, the demo and benchmarks (not production)."""
