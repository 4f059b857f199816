"""Triton kernel: q/k/v split + RoPE (rotate_half, fp32 math) + paged KV-cache write in one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, next_pow2
from .fused_ops_triton import _cast, _rne_bf16


@triton.jit
def _rope_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
                    s_x, s_cos, s_sin, s_qt, s_qh, s_kcb, s_kct, s_kch, s_vcb, s_vct, s_vch,
                    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF_P: tl.constexpr,
                    BH: tl.constexpr, BS: tl.constexpr, RNE_BF16: tl.constexpr):
    # grid (T, cdiv(H + Hkv, BH)): program (t, p) owns heads p*BH .. p*BH+BH-1 of the list [q heads | k heads].
    # q and k heads are adjacent in a qkv row, so head j (either kind) starts at column j*D; v head i at
    # (H + Hkv + i)*D. Programs holding k heads also copy the matching v heads. Tiles are [BH, HALF_P]: one for
    # each half of the head dim, so rotate_half needs no shuffles.
    HALF: tl.constexpr = D // 2
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * BH + tl.arange(0, BH)  # [BH]
    d = tl.arange(0, HALF_P)  # [HALF_P]
    d_ok = d < HALF
    is_q = head < H
    is_k = (head >= H) & (head < H + HKV)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    write = (tl.zeros([BH], tl.int64) + slot) >= 0  # [BH]; slot < 0: CUDA-graph padding row, q only
    slot = tl.maximum(slot, 0)
    blk, row = slot // BS, slot % BS

    pos = tl.load(pos_ptr + t).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * s_cos + d, mask=d_ok, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + pos * s_cos + HALF + d, mask=d_ok, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + pos * s_sin + d, mask=d_ok, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + pos * s_sin + HALF + d, mask=d_ok, other=0.0)[None, :]

    x_row = qkv_ptr + t * s_x
    m = (is_q | is_k)[:, None] & d_ok[None, :]  # [BH, HALF_P]
    col = head[:, None] * D + d[None, :]
    x1 = tl.load(x_row + col, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + col + HALF, mask=m, other=0.0).to(tl.float32)
    # x*cos + cat(-x2, x1)*sin in fp32, rounded once (GPU builds may contract to FMA: last-bit fp32 differences)
    o1 = _cast(x1 * c1 - x2 * s1, qkv_ptr.dtype.element_ty, RNE_BF16)
    o2 = _cast(x2 * c2 + x1 * s2, qkv_ptr.dtype.element_ty, RNE_BF16)

    mq = m & is_q[:, None]
    qh = tl.minimum(head, H - 1)[:, None]  # clamped so masked-off lanes still form in-range addresses
    q_out = q_ptr + t * s_qt + qh * s_qh + d[None, :]
    tl.store(q_out, o1, mask=mq)
    tl.store(q_out + HALF, o2, mask=mq)

    mk = m & (is_k & write)[:, None]
    kh = tl.minimum(tl.maximum(head - H, 0), HKV - 1)[:, None]
    k_out = kc_ptr + blk * s_kcb + row * s_kct + kh * s_kch + d[None, :]
    tl.store(k_out, o1, mask=mk)
    tl.store(k_out + HALF, o2, mask=mk)
    v_in = x_row + (H + HKV + kh) * D + d[None, :]
    v_out = vc_ptr + blk * s_vcb + row * s_vct + kh * s_vch + d[None, :]
    tl.store(v_out, tl.load(v_in, mask=mk), mask=mk)
    tl.store(v_out + HALF, tl.load(v_in + HALF, mask=mk), mask=mk)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_write_kv(qkv, positions, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                  head_dim) -> torch.Tensor:
    """See rope_kv.rope_write_kv (shapes already checked there). One launch; grid depends only on T and shapes."""
    T = qkv.shape[0]
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "cache head dim must be contiguous"
    qkv, cos, sin = _unit_last(qkv), _unit_last(cos), _unit_last(sin)
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    heads = num_heads + num_kv_heads
    half_p = next_pow2(head_dim // 2)
    bh = max(1, min(next_pow2(heads), 1024 // (2 * half_p)))  # ~1024 elements per program
    _rope_kv_kernel[(T, cdiv(heads, bh))](
        qkv, positions, cos, sin, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        H=num_heads, HKV=num_kv_heads, D=head_dim, HALF_P=half_p, BH=bh, BS=k_cache.shape[1],
        RNE_BF16=_rne_bf16(qkv), num_warps=4)
    return q
