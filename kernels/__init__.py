"""Compute kernels (Triton on CUDA) with torch references beside each op."""
