"""Model runner: batch tensors, forward context, KV cache."""
