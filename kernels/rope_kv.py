"""Attention prologue fused into one op: q/k/v split + RoPE (HF rotate_half) + paged KV-cache write.

The torch reference is the model's unfused composition (split, rotate_half_reference, attention.write_kv_reference),
so it is exact by construction; the Triton kernel (rope_kv_triton) does it all in one launch per layer.
"""
from __future__ import annotations

import torch

from .attention import write_kv_reference
from .fused_ops import resolve_backend


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D]; cos/sin fp32 broadcastable to x, holding [freqs, freqs] -> x*cos + rotate_half(x)*sin, math in
    fp32, rounded once to x's dtype. This is the model's RoPE (server/models/rope.py uses it)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def _check(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim) -> None:
    T = qkv.shape[0]
    want = (num_heads + 2 * num_kv_heads) * head_dim
    if (qkv.dim() != 2 or qkv.shape[1] != want or head_dim % 2 or num_heads % num_kv_heads
            or positions.shape != (T,) or slot_mapping.shape != (T,)
            or cos.dim() != 2 or cos.shape[1] != head_dim or sin.shape != cos.shape
            or k_cache.dim() != 4 or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim)
            or v_cache.shape != k_cache.shape or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype):
        raise ValueError(f"rope_write_kv: qkv {tuple(qkv.shape)} {qkv.dtype}, positions {tuple(positions.shape)}, "
                         f"cos/sin {tuple(cos.shape)}/{tuple(sin.shape)}, caches {tuple(k_cache.shape)} "
                         f"{k_cache.dtype}/{tuple(v_cache.shape)} {v_cache.dtype}, slots {tuple(slot_mapping.shape)}"
                         f" do not fit H={num_heads}, Hkv={num_kv_heads}, D={head_dim}")


def _write_kv_skipping_padding(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slots: torch.Tensor) -> None:
    """write_kv_reference where rows with slot < 0 write nothing, without a host sync (CUDA-graph safe): such rows
    repeat another write exactly (the first valid row's slot and k/v; with no valid row, slot 0 and the cache's
    own content), so index_copy_ sees only duplicate indices that carry identical values."""
    keep = slots >= 0
    j = keep.to(torch.uint8).argmax().view(1)  # first valid row, 0 when there is none
    any_valid = keep.index_select(0, j)  # [1]
    tgt = torch.where(any_valid, slots.index_select(0, j), torch.zeros_like(j))  # [1]
    fixed_slots = torch.where(keep, slots, tgt)
    rows = keep.view(-1, 1, 1)
    flat_k, flat_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
    fill_k = torch.where(any_valid.view(1, 1, 1), k.index_select(0, j), flat_k.index_select(0, tgt))  # [1, Hkv, D]
    fill_v = torch.where(any_valid.view(1, 1, 1), v.index_select(0, j), flat_v.index_select(0, tgt))
    write_kv_reference(torch.where(rows, k, fill_k), torch.where(rows, v, fill_v), k_cache, v_cache, fixed_slots)


def rope_write_kv_reference(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The unfused composition; same contract as rope_write_kv."""
    _check(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    T = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(T, num_heads, head_dim)
    k = k.reshape(T, num_kv_heads, head_dim)
    v = v.reshape(T, num_kv_heads, head_dim)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D]
    q, k = rotate_half_reference(q, c, s), rotate_half_reference(k, c, s)
    if T:
        _write_kv_skipping_padding(k, v, k_cache, v_cache, slot_mapping)
    return q


def _tri():
    from . import rope_kv_triton  # lazily: CPU installs without triton never import it

    return rope_kv_triton


def rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  num_heads: int, num_kv_heads: int, head_dim: int, backend: str = "auto") -> torch.Tensor:
    """qkv [T, (H + 2*Hkv) * D] (q | k | v; row stride may exceed the width), positions [T] int64,
    cos/sin [P, D] fp32 tables ([freqs, freqs]), caches [num_blocks, block_size, Hkv, D] in qkv's dtype,
    slot_mapping [T] int64 flat slots -> q [T, H, D], a new tensor, rotated, in qkv's dtype.
    Rotated k and v are written to the caches at their slots; rows with slot < 0 (CUDA-graph padding) write
    nothing. No host syncs; the Triton launch depends only on shapes (CUDA-graph safe).
    backend "auto" | "triton" | "torch" (env LORAMUX_FUSED_OPS_BACKEND overrides "auto")."""
    if resolve_backend(backend, qkv.device) == "torch":
        return rope_write_kv_reference(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                                       num_heads, num_kv_heads, head_dim)
    _check(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    return _tri().rope_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
                                num_heads, num_kv_heads, head_dim)
