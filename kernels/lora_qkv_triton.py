"""Triton: the q|k|v LoRA expand fused with RoPE and the paged KV-cache write (opt-in, kernels.lora.qkv_rope_kv).

Unfused, a step with adapters runs expand (qkv [T, (H + 2 Hkv) D] read and written in place) and then the
RoPE + KV-write kernel (qkv read again). Here one kernel reads each head's columns once, adds the token's q, k or
v delta rounded to qkv's dtype exactly as the in-place expand would, then rotates and writes q to its output and
k/v to their cache slots as rope_kv_triton does, so results equal the unfused Triton chain (bit for bit in 16-bit
dtypes; in fp32 the delta's dot on [BM, D/2] tiles may round its sum a few ulps differently). The tile
numbering runs over S + 1 groups of tokens (the last: tokens without adapter, which only get RoPE + KV write).
Grid (token tiles, H + Hkv): program (tile, j) owns head j of [q heads | k heads] for the tile's tokens; k-head
programs also move the matching v head. Each head is handled as two [BM, D/2] halves (rotate_half needs no
shuffles). Layouts as lora_triton (compact B blocks: lora_layout.py) and rope_kv_triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, next_pow2
from .fused_ops_triton import _cast, _rne_bf16
from .lora_layout import row_align
from .lora_mlp_triton import _segment_tile_all, _with_delta
from .lora_tiles_triton import TILES_SLOW, _first_h, _slot_value, _table_tile, _tile_pid, _tile_tokens, tile_grid
from .lora_meta import expand_block_m, expand_tiles
from .lora_triton import _pow2, tile_table


@triton.jit
def _head(y_rows, h_rows, b_blk, col, n_rel, d, d_ok, row_ok, rank, scale, T, LR, HALF: tl.constexpr,
          NUM_PARTS: tl.constexpr, BLOCK_M: tl.constexpr, HALF_P: tl.constexpr, BLOCK_R: tl.constexpr,
          R_TILES: tl.constexpr, EXACT: tl.constexpr, RA: tl.constexpr, DTYPE: tl.constexpr):
    """One head's halves, columns col + d and col + HALF + d of y ([BM, 1] row pointers), each plus the slice's
    delta (B rows n_rel + ..., relative to the slice start) rounded as the in-place expand would -> fp32 x2, mask."""
    m = row_ok[:, None] & d_ok[None, :]
    x1 = tl.load(y_rows + col + d[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(y_rows + col + HALF + d[None, :], mask=m, other=0.0).to(tl.float32)
    h = _first_h(h_rows, rank, row_ok, T, LR, NUM_PARTS, BLOCK_M, BLOCK_R, R_TILES)
    x1 = _with_delta(x1, h, h_rows, b_blk, n_rel + d, d_ok, rank, scale, row_ok, T, LR, NUM_PARTS, BLOCK_M,
                     HALF_P, BLOCK_R, R_TILES, EXACT, RA, DTYPE)
    x2 = _with_delta(x2, h, h_rows, b_blk, n_rel + HALF + d, d_ok, rank, scale, row_ok, T, LR, NUM_PARTS, BLOCK_M,
                     HALF_P, BLOCK_R, R_TILES, EXACT, RA, DTYPE)
    return x1, x2, m


@triton.jit
def _expand_rope_kv_kernel(buf_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, seg_start_ptr,
                           tslot_ptr, ttok_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
                           T, N, R, S, s_y, s_cos, s_sin, s_qt, s_qh, s_kcb, s_kct, s_kch, s_vcb, s_vct, s_vch,
                           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF_P: tl.constexpr,
                           BS: tl.constexpr, NUM_PARTS: tl.constexpr, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_R: tl.constexpr, R_TILES: tl.constexpr, EXACT: tl.constexpr, RA: tl.constexpr,
                           RNE_BF16: tl.constexpr, TILES_SLOW: tl.constexpr, TABLE: tl.constexpr):
    HALF: tl.constexpr = D // 2
    pid_m, head = _tile_pid(0, 1, TILES_SLOW)
    # head < H: q head; else k head (head - H), whose v head this program moves too
    is_q = head < H
    sl = tl.where(is_q, 0, 1)  # LoRA slice of this head: q = 0, k = 1 (v = 2 below)
    if TABLE:  # slot, tokens, ranks and scales in one round trip (lora_meta.TILE_TABLE); slot S: no adapter
        slot, tok, row_ok = _table_tile(pid_m, tslot_ptr, ttok_ptr, BLOCK_M)
        rank = _slot_value(ranks_ptr, slot, sl, 3, S, S_POW2)
        scale = _slot_value(scales_ptr, slot, sl, 3, S, S_POW2)
        rank_v = _slot_value(ranks_ptr, slot, 2, 3, S, S_POW2)
        scale_v = _slot_value(scales_ptr, slot, 2, 3, S, S_POW2)
        if slot > S:
            return
    else:
        slot, row0, seg_hi = _segment_tile_all(pid_m, seg_start_ptr, S, T, S_POW2, BLOCK_M)
        if slot > S:
            return
        has = slot < S
        tok, row_ok = _tile_tokens(row0, seg_hi, sorted_ptr, BLOCK_M)  # [BM] token ids
        rank = tl.load(ranks_ptr + slot * 3 + sl, mask=has, other=0)
        scale = tl.load(scales_ptr + slot * 3 + sl, mask=has, other=0.0)
    d = tl.arange(0, HALF_P)
    d_ok = d < HALF
    DTYPE = y_ptr.dtype.element_ty
    LR = 3 * R
    y_rows = y_ptr + tok[:, None] * s_y  # [BM, 1]
    b_slot = b_ptr + slot.to(tl.int64) * N * R
    # this head's columns: q head h at h*D (slice 0 starts at 0); k head j at (H + j)*D (slice 1 at H*D)
    col = head * D
    s_lo = tl.where(is_q, 0, H * D)
    h_rows = buf_ptr + tok[:, None] * LR + sl * R
    x1, x2, m = _head(y_rows, h_rows, b_slot + s_lo * R, col, col - s_lo, d, d_ok, row_ok, rank, scale, T, LR, HALF,
                      NUM_PARTS, BLOCK_M, HALF_P, BLOCK_R, R_TILES, EXACT, RA, DTYPE)
    pos = tl.load(pos_ptr + tok, mask=row_ok, other=0).to(tl.int64)[:, None]  # [BM, 1]
    c1 = tl.load(cos_ptr + pos * s_cos + d[None, :], mask=m, other=0.0)
    c2 = tl.load(cos_ptr + pos * s_cos + HALF + d[None, :], mask=m, other=0.0)
    s1 = tl.load(sin_ptr + pos * s_sin + d[None, :], mask=m, other=0.0)
    s2 = tl.load(sin_ptr + pos * s_sin + HALF + d[None, :], mask=m, other=0.0)
    o1 = _cast(x1 * c1 - x2 * s1, DTYPE, RNE_BF16)  # as rope_kv_triton: fp32 math, rounded once
    o2 = _cast(x2 * c2 + x1 * s2, DTYPE, RNE_BF16)
    if is_q:
        q_out = q_ptr + tok[:, None] * s_qt + head * s_qh + d[None, :]
        tl.store(q_out, o1, mask=m)
        tl.store(q_out + HALF, o2, mask=m)
    else:
        kh = head - H
        kv_slot = tl.load(slot_ptr + tok, mask=row_ok, other=-1).to(tl.int64)  # < 0: CUDA-graph padding row
        mk = m & (kv_slot >= 0)[:, None]
        kv_slot = tl.maximum(kv_slot, 0)
        blk, brow = (kv_slot // BS)[:, None], (kv_slot % BS)[:, None]
        k_out = kc_ptr + blk * s_kcb + brow * s_kct + kh * s_kch + d[None, :]
        tl.store(k_out, o1, mask=mk)
        tl.store(k_out + HALF, o2, mask=mk)
        # v head kh: columns (H + HKV + kh)*D, slice 2 (starts at (H + HKV)*D); no rotation
        vcol = (H + HKV + kh) * D
        v_lo = (H + HKV) * D
        if not TABLE:
            rank_v = tl.load(ranks_ptr + slot * 3 + 2, mask=slot < S, other=0)
            scale_v = tl.load(scales_ptr + slot * 3 + 2, mask=slot < S, other=0.0)
        hv_rows = buf_ptr + tok[:, None] * LR + 2 * R
        v1, v2, _ = _head(y_rows, hv_rows, b_slot + v_lo * R, vcol, vcol - v_lo, d, d_ok, row_ok, rank_v, scale_v,
                          T, LR, HALF, NUM_PARTS, BLOCK_M, HALF_P, BLOCK_R, R_TILES, EXACT, RA, DTYPE)
        v_out = vc_ptr + blk * s_vcb + brow * s_vct + kh * s_vch + d[None, :]
        tl.store(v_out, v1.to(DTYPE), mask=mk)
        tl.store(v_out + HALF, v2.to(DTYPE), mask=mk)


def expand_rope_kv(y, buf, b_stack, ranks, scales, meta, positions, cos, sin, k_cache, v_cache, slot_mapping,
                   num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """y [T, (H + 2 Hkv) D] base q|k|v output (not modified), buf fp32 [P, T, 3R] (lora_triton.shrink_partials)
    -> q [T, H, D] rotated, with each token's delta added to q, k and v first; k (rotated) and v written to the
    caches at slot_mapping (rows < 0 skipped). Same contract as rope_kv.rope_write_kv otherwise."""
    T, N = y.shape
    S, _, R = b_stack.shape
    q = torch.empty(T, num_heads, head_dim, dtype=y.dtype, device=y.device)
    if T == 0:
        return q
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    bm, br = expand_block_m(T), min(64, _pow2(R))
    grid = tile_grid(expand_tiles(T, S + 1), num_heads + num_kv_heads)
    _expand_rope_kv_kernel[grid](
        buf, b_stack, y, ranks, scales, meta.sorted_tokens, meta.seg_start, *tile_table(meta), positions, cos, sin,
        slot_mapping, q,
        k_cache, v_cache, T, N, R, S, y.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        H=num_heads, HKV=num_kv_heads, D=head_dim, HALF_P=max(16, next_pow2(head_dim // 2)), BS=k_cache.shape[1],
        NUM_PARTS=buf.shape[0], S_POW2=_pow2(S + 1, 2), BLOCK_M=bm, BLOCK_R=br, R_TILES=cdiv(R, br),
        EXACT=y.dtype == torch.float32, RA=row_align(R), RNE_BF16=_rne_bf16(y), TILES_SLOW=TILES_SLOW,
        TABLE=meta.tile_slot is not None,
        num_warps=4, num_stages=2)
    return q
