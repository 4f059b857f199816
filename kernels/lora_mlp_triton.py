"""Triton: the gate|up LoRA expand fused with SiLU*mul, so the MLP's wide gate|up output is read once and never
rewritten (opt-in, kernels.lora.gate_up_silu).

Unfused, a step with adapters runs expand (y[T, 2I] read and written in place) and then silu_mul (y read again,
act[T, I] written). Here one kernel reads y, adds each token's delta to its gate and up columns, rounds them to
y's dtype exactly as the in-place expand would, and writes act = silu(gate) * up rounded as silu_mul does, so the
result equals the unfused Triton chain bit for bit. Every token needs act, adapter or not: the tile numbering runs
over S + 1 groups, the last being the tokens without adapter (sorted last by build_lora_meta), which only get
SiLU*mul. Layouts: y [T, 2I] (gate | up; any row stride), buf fp32 [P, T, 2R] split-K partials of the shrink,
b [S, 2I, R] (compact blocks, lora_layout.py), ranks int32 [S, 2], scales fp32 [S, 2] (slice 0 = gate, 1 = up),
act [T, I].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv
from .fused_ops_triton import _cast, _rne_bf16
from .lora_layout import row_align
from .lora_tiles_triton import (TILES_SLOW, _first_h, _lora_delta, _pick_tile, _slot_value, _table_tile, _tile_pid,
                                _tile_tokens, tile_grid)
from .lora_meta import expand_block_m, expand_tiles
from .lora_triton import DECODE_N_ITERS, _pow2, tile_table


@triton.jit
def _segment_tile_all(pid, seg_start_ptr, S, T, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """_segment_tile over S + 1 groups (S_POW2 >= S + 1): group S = tokens without adapter, rows seg_start[S]..T."""
    s = tl.arange(0, S_POW2)
    lo = tl.load(seg_start_ptr + s, mask=s <= S, other=0)
    hi = tl.where(s == S, T, tl.load(seg_start_ptr + s + 1, mask=s < S, other=0))
    return _pick_tile(pid, s, lo, hi, BLOCK_M)


@triton.jit
def _with_delta(v, h, h_rows, b_blk, nn, n_ok, rank, scale, row_ok, T, LR, NUM_PARTS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr,
                EXACT: tl.constexpr, RA: tl.constexpr, DTYPE: tl.constexpr):
    """v (fp32 [BM, BN], one slice's columns of y) plus that slice's LoRA delta, rounded to y's dtype like the
    in-place expand's store; unchanged when the rank is 0."""
    if rank > 0:
        acc = _lora_delta(h, h_rows, b_blk, nn, n_ok, rank, row_ok, T, LR, NUM_PARTS, BLOCK_M, BLOCK_N,
                          BLOCK_R, R_TILES, EXACT, RA)
        v = (v + acc * scale).to(DTYPE).to(tl.float32)
    return v


@triton.jit
def _expand_silu_kernel(buf_ptr, b_ptr, y_ptr, out_ptr, ranks_ptr, scales_ptr, sorted_ptr, seg_start_ptr,
                        tslot_ptr, ttok_ptr, T, I, R, S, sy_t, so_t,
                        NUM_PARTS: tl.constexpr, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr,
                        N_ITERS: tl.constexpr, EXACT: tl.constexpr, RA: tl.constexpr, RNE_BF16: tl.constexpr,
                        TILES_SLOW: tl.constexpr, TABLE: tl.constexpr):
    # act[t, n] = silu(g) * u, g = y[t, n] + delta_gate, u = y[t, I + n] + delta_up (deltas of slot(t), if any)
    pid_m, pid_n = _tile_pid(0, 1, TILES_SLOW)  # pid_n: chunk of N_ITERS * BLOCK_N columns of act
    if TABLE:  # slot, tokens, ranks and scales in one round trip (lora_meta.TILE_TABLE); slot S: no adapter
        slot, tok, row_ok = _table_tile(pid_m, tslot_ptr, ttok_ptr, BLOCK_M)
        rank_g = _slot_value(ranks_ptr, slot, 0, 2, S, S_POW2)
        rank_u = _slot_value(ranks_ptr, slot, 1, 2, S, S_POW2)
        scale_g = _slot_value(scales_ptr, slot, 0, 2, S, S_POW2)
        scale_u = _slot_value(scales_ptr, slot, 1, 2, S, S_POW2)
        if slot > S:
            return
    else:
        slot, row0, seg_hi = _segment_tile_all(pid_m, seg_start_ptr, S, T, S_POW2, BLOCK_M)
        if slot > S:
            return
        has = slot < S  # slot S: tokens without adapter (SiLU*mul only)
        tok, row_ok = _tile_tokens(row0, seg_hi, sorted_ptr, BLOCK_M)  # [BM] token ids
        rank_g = tl.load(ranks_ptr + slot * 2, mask=has, other=0)
        rank_u = tl.load(ranks_ptr + slot * 2 + 1, mask=has, other=0)
        scale_g = tl.load(scales_ptr + slot * 2, mask=has, other=0.0)
        scale_u = tl.load(scales_ptr + slot * 2 + 1, mask=has, other=0.0)
    hg_rows = buf_ptr + tok[:, None] * (2 * R)  # [BM, 1]
    hu_rows = hg_rows + R
    bg_blk = b_ptr + slot.to(tl.int64) * 2 * I * R  # compact gate block; the up block starts at column I
    bu_blk = bg_blk + I * R
    h_g = _first_h(hg_rows, rank_g, row_ok, T, 2 * R, NUM_PARTS, BLOCK_M, BLOCK_R, R_TILES)
    h_u = _first_h(hu_rows, rank_u, row_ok, T, 2 * R, NUM_PARTS, BLOCK_M, BLOCK_R, R_TILES)
    DTYPE = y_ptr.dtype.element_ty
    for it in range(N_ITERS):
        nn = pid_n * (BLOCK_N * N_ITERS) + it * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = nn < I
        m = row_ok[:, None] & n_ok[None, :]
        yp = y_ptr + tok[:, None] * sy_t + nn[None, :]
        g = tl.load(yp, mask=m, other=0.0).to(tl.float32)
        u = tl.load(yp + I, mask=m, other=0.0).to(tl.float32)
        g = _with_delta(g, h_g, hg_rows, bg_blk, nn, n_ok, rank_g, scale_g, row_ok, T, 2 * R, NUM_PARTS,
                        BLOCK_M, BLOCK_N, BLOCK_R, R_TILES, EXACT, RA, DTYPE)
        u = _with_delta(u, h_u, hu_rows, bu_blk, nn, n_ok, rank_u, scale_u, row_ok, T, 2 * R, NUM_PARTS,
                        BLOCK_M, BLOCK_N, BLOCK_R, R_TILES, EXACT, RA, DTYPE)
        s = _cast(g / (1.0 + tl.exp(-g)), DTYPE, RNE_BF16).to(tl.float32)  # as fused_ops_triton.silu_mul
        tl.store(out_ptr + tok[:, None] * so_t + nn[None, :], _cast(s * u, DTYPE, RNE_BF16), mask=m)


def expand_silu(y, buf, b_stack, ranks, scales, meta, n_iters: int | None = None) -> torch.Tensor:
    """y [T, 2I] base gate|up output (not modified), buf fp32 [P, T, 2R] (lora_triton.shrink_partials) ->
    act [T, I] = silu(gate) * up with each token's adapter delta added to gate and up first."""
    T, N = y.shape
    S, _, R = b_stack.shape
    I = N // 2
    act = torch.empty(T, I, dtype=y.dtype, device=y.device)
    if T == 0:
        return act
    bm, bn, br = expand_block_m(T), 128, min(64, _pow2(R))
    n_iters = n_iters or (DECODE_N_ITERS if T <= 256 else 4)  # as the expand kernel
    grid = tile_grid(expand_tiles(T, S + 1), cdiv(I, bn * n_iters))
    _expand_silu_kernel[grid](
        buf, b_stack, y, act, ranks, scales, meta.sorted_tokens, meta.seg_start, *tile_table(meta), T, I, R, S,
        y.stride(0),
        act.stride(0), NUM_PARTS=buf.shape[0], S_POW2=_pow2(S + 1, 2), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
        R_TILES=cdiv(R, br), N_ITERS=n_iters, EXACT=y.dtype == torch.float32, RA=row_align(R),
        RNE_BF16=_rne_bf16(y), TILES_SLOW=TILES_SLOW, TABLE=meta.tile_slot is not None,
        num_warps=8 if bm >= 64 else 4, num_stages=2)  # 8 warps at prefill tiles: no register spills on sm_90
    return act
