"""Benchmarks: the runner, llama-bench-style and native contexts, compare, output files.

Import edge.bench.runner / edge.bench.compare directly (the device probe they use is the
base module edge.device).
"""
