"""Benchmarks and the device probe."""
