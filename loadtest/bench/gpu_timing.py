"""GPU timing helpers shared by the offline benchmarks: CUDA-event timing and the copy-bandwidth floor."""
from __future__ import annotations

import torch


def cuda_time_us(fn, iters: int, warmup: int = 3) -> float:
    """Mean microseconds per call of fn, timed with CUDA events after a warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """bytes/s of a large device-to-device copy (read + write counted): the floor every ratio is taken to."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (cuda_time_us(lambda: dst.copy_(src), 20) * 1e-6)
