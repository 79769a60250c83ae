"""Benchmarks (runner, compare) and the device probe.

Kept import-free: edge.telemetry imports edge.bench.device, and the runner imports
telemetry. Import edge.bench.runner / edge.bench.compare directly.
"""
