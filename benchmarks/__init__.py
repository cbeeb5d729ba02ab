"""Benchmark scripts (``python -m benchmarks.<name> [--quick]``); results go to ``benchmarks/results/``."""
