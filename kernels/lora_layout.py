"""Where each slot's B matrices sit inside a B stack [S, N, R] (N = output columns, R = the slots' rank limit).

Slot s, slice i (output columns lo..hi, width w = hi - lo) with rank r < R would waste most of each row if its
[w, r] matrix were stored with row stride R: a kernel reading row n fetches r of every R elements, and DRAM moves
whole bursts, so r = 16 in rank-64 slots would read B at a quarter of the bandwidth. So the matrix is stored
row-major with row stride b_row_stride(r, R) (r rounded up to a multiple of 8 when R allows: 16-byte aligned rows
for vector loads) starting at flat offset lo * R of the slot's [N, R] block: the first w * stride elements of the
slice's w * R. When r == R (or R = r everywhere, as in the kernel benchmarks) this is the plain [S, N, R] layout.
"""
from __future__ import annotations

import torch


def row_align(R: int) -> int:
    """Row stride granularity for rank limit R (8 elements when R is a multiple of 8, so stride <= R always)."""
    return 8 if R % 8 == 0 else 1


def b_row_stride(rank: int, R: int) -> int:
    a = row_align(R)
    return -(-rank // a) * a


def b_block(b: torch.Tensor, lo: int, hi: int, rank: int) -> torch.Tensor:
    """View [..., hi - lo, rank] of the B matrix of columns lo..hi and the given rank, in b [..., N, R] (one
    slot's block, or a slot's blocks over layers; the last two dims contiguous). Read it or copy into it."""
    N, R = b.shape[-2:]
    if b.stride(-1) != 1 or b.stride(-2) != R or not 0 <= lo <= hi <= N or not 0 <= rank <= R:
        raise ValueError(f"b_block: b {tuple(b.shape)} strides {b.stride()}, columns {lo}..{hi}, rank {rank}")
    size = (*b.shape[:-2], hi - lo, rank)
    stride = (*b.stride()[:-2], b_row_stride(rank, R), 1)
    return b.as_strided(size, stride, b.storage_offset() + lo * R)


def pack_b(b: torch.Tensor, ranks: torch.Tensor, slice_offsets, fill: float = 0.0) -> torch.Tensor:
    """Logical per-slot B [S, N, R] (slot s, slice i uses b[s, lo:hi, :ranks[s, i]]) -> a B stack in the layout
    above; every element no block uses is `fill` (tests pass NaN: a kernel that reads one fails)."""
    out = torch.full_like(b, fill)
    for s, row in enumerate(ranks.tolist()):
        for i, r in enumerate(row):
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            b_block(out[s], lo, hi, r).copy_(b[s, lo:hi, :r])
    return out
