"""Torch reference of the multi-LoRA ops, grouped by slot (index_select / index_copy); used on CPU in production."""
from __future__ import annotations

import torch

from .lora_layout import b_block

# These functions sync with the host (they read the segment table and ranks as Python ints), so they are
# not CUDA-graph safe; the Triton path is. Math: fp32 accumulation, y rounded once to its dtype.


def _groups(meta) -> list[tuple[int, torch.Tensor]]:
    """[(slot, int64 token ids of that slot)] for every slot with at least one token."""
    S = meta.num_slots
    seg = meta.seg_start[: S + 1].tolist()
    order = meta.sorted_tokens[: seg[S]].long()
    return [(s, order[seg[s]:seg[s + 1]]) for s in range(S) if seg[s + 1] > seg[s]]


def shrink(x: torch.Tensor, a_stack: torch.Tensor, ranks: torch.Tensor, meta, out: torch.Tensor,
           groups=None, ranks_host=None) -> None:
    """out fp32 [T, L*R] := x @ A_slot^T for each token's slot, slices cut to their rank (rest left as is)."""
    L = ranks.shape[1]
    R = a_stack.shape[1] // L
    groups = _groups(meta) if groups is None else groups
    ranks_host = ranks.tolist() if ranks_host is None else ranks_host
    for s, idx in groups:
        rk = ranks_host[s]
        if not any(rk):
            continue
        xs = x.index_select(0, idx).float()  # [n, K]
        for i in range(L):
            if rk[i]:
                a = a_stack[s, i * R: i * R + rk[i]].float()  # [r, K]
                out[idx, i * R: i * R + rk[i]] = xs @ a.T


def expand(y: torch.Tensor, buf: torch.Tensor, b_stack: torch.Tensor, ranks: torch.Tensor,
           scales: torch.Tensor, slice_offsets, meta, groups=None, ranks_host=None) -> None:
    """y[t, off_i:off_i+1] += scale[s, i] * buf[t, i*R : i*R+rank] @ B[s, off_i:off_i+1, :rank]^T."""
    L = len(slice_offsets) - 1
    R = b_stack.shape[2]
    groups = _groups(meta) if groups is None else groups
    ranks_host = ranks.tolist() if ranks_host is None else ranks_host
    scales_host = scales.tolist()
    for s, idx in groups:
        rk = ranks_host[s]
        if not any(rk):
            continue
        ys = y.index_select(0, idx).float()  # [n, N]
        hs = buf.index_select(0, idx)  # [n, L*R] fp32
        for i in range(L):
            r, lo, hi = rk[i], slice_offsets[i], slice_offsets[i + 1]
            if r:
                b = b_block(b_stack[s], lo, hi, r).float()  # [w, r]
                ys[:, lo:hi] += scales_host[s][i] * (hs[:, i * R: i * R + r] @ b.T)
        y.index_copy_(0, idx, ys.to(y.dtype))


def add_lora(y, x, a_stack, b_stack, ranks, scales, slice_offsets, meta) -> None:
    """shrink + expand, sharing one host read of the segment table."""
    groups = _groups(meta)
    ranks_host = ranks.tolist()
    buf = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    shrink(x, a_stack, ranks, meta, buf, groups, ranks_host)
    expand(y, buf, b_stack, ranks, scales, slice_offsets, meta, groups, ranks_host)
