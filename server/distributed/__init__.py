"""Tensor parallelism: process groups, sharded layers, LoRA shards and the worker loop of ranks > 0."""
