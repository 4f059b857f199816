"""Offline benchmarks that drive the engine and kernels in-process (unlike the black-box load generator)."""
