"""Triton multi-LoRA kernels: segmented (sorted-by-slot) shrink and expand, multi-slice, rank-masked, no atomics.
add_lora can dispatch decode-sized T to the single-launch kernel of lora_fused_triton.py (off by default: slower)."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpreter_on, next_pow2
from .lora_layout import row_align
from .lora_meta import block_m as _block_m
from .lora_meta import expand_block_m, expand_tiles
from .lora_tiles_triton import (TILES_SLOW, _first_h, _lora_delta, _segment_tile, _slice_chunk, _slot_value,
                                _table_tile, _tile_pid, _tile_tokens, slice_chunks, tile_grid)

# Work decomposition, layouts and the expand-side tile math: lora_tiles_triton.py.


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, ranks_ptr, sorted_ptr, seg_start_ptr, T, K, R, S, sx_t,
                   L: tl.constexpr, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, DOT_F32: tl.constexpr, TILES_SLOW: tl.constexpr):
    # out[p, t, i*R + j] = sum_{k in split p} x[t, k] * a[slot(t), i*R + j, k]   for j < rank[slot, i]
    pid_lr = tl.program_id(0)  # (slice, rank tile) fastest: programs sharing x rows run together (L2)
    pid_m, pid_k = _tile_pid(1, 2, TILES_SLOW)  # grid (L*R tiles, tiles, parts), or (..., parts, tiles)
    sl = pid_lr % L
    r0 = (pid_lr // L) * BLOCK_R
    slot, row0, seg_hi = _segment_tile(pid_m, seg_start_ptr, S, S_POW2, BLOCK_M)
    if slot >= S:
        return
    rank = tl.load(ranks_ptr + slot * L + sl)
    if r0 >= rank:
        return
    tok, row_ok = _tile_tokens(row0, seg_hi, sorted_ptr, BLOCK_M)  # [BM] token ids
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < rank  # rows of A past the rank (padding) are never loaded
    cols = sl * R + rr  # [BR] row of A = column of out
    LR = L * R
    x_rows = x_ptr + tok[:, None] * sx_t  # [BM, 1]
    a_rows = a_ptr + slot.to(tl.int64) * LR * K + cols[:, None] * K  # [BR, 1]
    k_lo = pid_k * (K_ITERS * BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for ki in range(K_ITERS):
        kk = k_lo + ki * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        at = tl.load(a_rows + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BR, BK]
        if DOT_F32:
            acc += tl.dot(xt.to(tl.float32), tl.trans(at).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at))
    o = out_ptr + pid_k.to(tl.int64) * T * LR + tok[:, None] * LR + cols[None, :]
    tl.store(o, acc, mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(buf_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, seg_start_ptr, tslot_ptr, ttok_ptr,
                   T, N, R, S, OFF1, OFF2, OFF3, sy_t,
                   L: tl.constexpr, NUM_PARTS: tl.constexpr, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr,
                   N_ITERS: tl.constexpr, EXACT: tl.constexpr, RA: tl.constexpr, TILES_SLOW: tl.constexpr,
                   TABLE: tl.constexpr):
    # y[t, n] += scale[s, i] * sum_{j < rank[s, i]} (sum_p buf[p, t, i*R + j]) * B_si[n - lo_i, j],  n in slice i
    pid_m, pid_n = _tile_pid(0, 1, TILES_SLOW)  # pid_n: chunk of N_ITERS * BLOCK_N columns inside one slice
    sl, n0, n_hi, s_lo = _slice_chunk(pid_n, OFF1, OFF2, OFF3, N, BLOCK_N * N_ITERS)
    if TABLE:  # slot, tokens, rank and scale in one round trip (lora_meta.TILE_TABLE)
        slot, tok, row_ok = _table_tile(pid_m, tslot_ptr, ttok_ptr, BLOCK_M)
        rank = _slot_value(ranks_ptr, slot, sl, L, S, S_POW2)
        scale = _slot_value(scales_ptr, slot, sl, L, S, S_POW2)
        if slot >= S:
            return
        if rank == 0:
            return
    else:
        slot, row0, seg_hi = _segment_tile(pid_m, seg_start_ptr, S, S_POW2, BLOCK_M)
        if slot >= S:
            return
        rank = tl.load(ranks_ptr + slot * L + sl)
        if rank == 0:
            return
        scale = tl.load(scales_ptr + slot * L + sl)
        tok, row_ok = _tile_tokens(row0, seg_hi, sorted_ptr, BLOCK_M)  # [BM] token ids
    h_rows = buf_ptr + tok[:, None] * (L * R) + sl * R  # [BM, 1]
    b_blk = b_ptr + (slot.to(tl.int64) * N + s_lo) * R  # this slot-slice's compact B block
    h = _first_h(h_rows, rank, row_ok, T, L * R, NUM_PARTS, BLOCK_M, BLOCK_R, R_TILES)
    for it in range(N_ITERS):
        nn = n0 + it * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = nn < n_hi
        yp = y_ptr + tok[:, None] * sy_t + nn[None, :]
        m = row_ok[:, None] & n_ok[None, :]
        yv = tl.load(yp, mask=m, other=0.0).to(tl.float32)  # issued early: overlaps the B loads
        acc = _lora_delta(h, h_rows, b_blk, nn - s_lo, n_ok, rank, row_ok, T, L * R, NUM_PARTS, BLOCK_M,
                          BLOCK_N, BLOCK_R, R_TILES, EXACT, RA)
        tl.store(yp, (yv + acc * scale).to(y_ptr.dtype.element_ty), mask=m)


# Decode launch shape (T <= 256). The session-7 H100 profile showed decode shrinks at ~8-10 us and expands at
# ~10-12 us each, far above launch latency: each program walks K_ITERS (shrink) or N_ITERS (expand) dependent
# memory round trips. These knobs trade fewer round trips per program for more split-K partials / programs;
# measured in the engine (session 8, docs/performance.md): 32 splits of 128 and one tile per expand program were
# no faster at D = 1 and 6-8% slower at D = 32, so the session-3 sweep's defaults stay.
DECODE_K_PER_SPLIT = int(os.environ.get("LORAMUX_LORA_DECODE_K_PER_SPLIT", "512"))  # K columns per shrink split
MAX_SPLITS = int(os.environ.get("LORAMUX_LORA_MAX_SPLITS", "16"))
DECODE_N_ITERS = int(os.environ.get("LORAMUX_LORA_DECODE_N_ITERS", "2"))  # column tiles per expand program


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(max(int(n), 1)))



def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 inputs use exact (ieee, not tf32) dots. The interpreter multiplies bf16 as raw uint16, so there bf16
    operands are widened to fp32 first (bf16 products are exact in fp32, as on tensor cores)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_on())


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_table(meta) -> tuple:
    """The tile table's two buffers for a launch (the seg_start buffer stands in, unread, when there is none)."""
    return (meta.tile_slot, meta.tile_tok) if meta.tile_slot is not None else (meta.seg_start, meta.seg_start)


@lru_cache(maxsize=4096)  # host ints only; called per linear group per eager step
def shrink_plan(T: int, K: int, L: int, R: int, device: torch.device, split_k: int | None = None) -> dict:
    """Host-only launch plan (ints derived from shapes, never from device values). parts = split-K partials."""
    bm, br = _block_m(T), min(64, _pow2(R))
    bk = 128 if T <= 256 else 64
    if split_k is None:  # decode: few output tiles, so split K; prefill: split only to fill the SMs
        tiles = cdiv(T, bm) * L * cdiv(R, br)
        split_k = K // DECODE_K_PER_SPLIT if T <= 256 else cdiv(2 * _num_sms(device), tiles)
        split_k = max(1, min(MAX_SPLITS, split_k, K // (128 if T <= 256 else 256)))
        if T > 256:  # a power of two: K_ITERS / NUM_PARTS are constexprs, so every distinct value is a compile
            split_k = 1 << (split_k.bit_length() - 1)  # (each ~1 s, stalling the server the first time it is seen)
    bk = max(16, min(bk, _pow2(cdiv(K, split_k))))
    k_iters = cdiv(cdiv(K, split_k), bk)
    return dict(bm=bm, br=br, bk=bk, k_iters=k_iters, parts=cdiv(K, k_iters * bk))


def launch_key(T: int, K: int, L: int, R: int, device: torch.device) -> tuple:
    """Everything of add_lora's launches (heuristic path) that Triton compiles for, as a function of T (the other
    inputs are fixed by the model). Two-launch path: the constexprs of both plans plus T's own integer
    specialization (== 1, % 16). Fused path: its constexprs only (T is not a kernel argument there)."""
    if _fused.use_fused(T, K, R):
        return (None, None, tuple(sorted(_fused.fused_plan(T, K, R).items())), "fused")
    plan = shrink_plan(T, K, L, R, device)
    return (T == 1, T % 16 == 0, tuple(sorted(plan.items())), 2 if T <= 256 else 4)


def shrink(x, a_stack, ranks, meta, out, plan: dict) -> None:
    """out: fp32 [P, T, L*R] (P = plan['parts']); writes out[p, t, i*R + j] for slot(t) >= 0, j < rank."""
    T, K = x.shape
    S, LR, _ = a_stack.shape
    L = ranks.shape[1]
    R = LR // L
    if T == 0 or R == 0:
        return
    grid = (L * cdiv(R, plan["br"]), *tile_grid(cdiv(T, plan["bm"]) + min(S, T), plan["parts"]))
    _shrink_kernel[grid](
        x, a_stack, out, ranks, meta.sorted_tokens, meta.seg_start, T, K, R, S, x.stride(0),
        L=L, S_POW2=_pow2(S, 2), BLOCK_M=plan["bm"], BLOCK_R=plan["br"], BLOCK_K=plan["bk"],
        K_ITERS=plan["k_iters"], DOT_F32=_dot_f32(x.dtype), TILES_SLOW=TILES_SLOW, num_warps=4, num_stages=3)


def expand(y, buf, b_stack, ranks, scales, slice_offsets, meta, n_iters: int | None = None) -> None:
    """buf: fp32 [P, T, L*R] partial sums (added in order); y [T, N] updated in place."""
    T, N = y.shape
    S, _, R = b_stack.shape
    L = len(slice_offsets) - 1
    if T == 0 or R == 0:
        return
    bm, bn, br = expand_block_m(T), 128, min(64, _pow2(R))
    n_iters = n_iters or (DECODE_N_ITERS if T <= 256 else 4)  # column tiles per program (H100 sweep: 2 decode)
    offs, chunks = slice_chunks(slice_offsets, bn * n_iters)  # OFF1..OFF3 (unused slices empty), chunk count
    grid = tile_grid(expand_tiles(T, S), chunks)
    _expand_kernel[grid](
        buf, b_stack, y, ranks, scales, meta.sorted_tokens, meta.seg_start, *tile_table(meta), T, N, R, S, *offs,
        y.stride(0),
        L=L, NUM_PARTS=buf.shape[0], S_POW2=_pow2(S, 2), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
        R_TILES=cdiv(R, br), N_ITERS=n_iters, EXACT=y.dtype == torch.float32, RA=row_align(R),
        TILES_SLOW=TILES_SLOW, TABLE=meta.tile_slot is not None, num_warps=4, num_stages=2)


def add_lora(y, x, a_stack, b_stack, ranks, scales, slice_offsets, meta, split_k: int | None = None,
             fused: bool | None = None) -> None:
    """fused: True = one fused launch (lora_fused_triton), False = shrink + expand, None = heuristic (fused for
    decode-sized T, see lora_fused_triton.use_fused; never when split_k is given)."""
    T, K = x.shape
    L = ranks.shape[1]
    R = a_stack.shape[1] // L
    if fused and split_k is not None:
        raise ValueError("split_k applies to the two-launch path only (fused=True given)")
    if fused or (fused is None and split_k is None and _fused.use_fused(T, K, R)):
        _fused.fused_add_lora(y, x, a_stack, b_stack, ranks, scales, slice_offsets, meta)
        return
    buf = shrink_partials(x, a_stack, ranks, meta, new_partials(x, a_stack, ranks, split_k), split_k)
    expand(y, buf, b_stack, ranks, scales, slice_offsets, meta)


# On by default (session 11, H100: with TILE_TABLE and EXPAND_BM1, decode D = 32 8.07 vs 8.84 ms, D = 1 even): a
# decode shrink's split-K partials summed by one extra launch right after it (on the side stream when overlapped),
# so every expand program loads one [T, L*R] tile instead of P. The sum adds the partials in the order the expands
# add them (_partials_h), so either way gives bit-equal outputs at every T (torch.sum's order depends on the shape:
# mixed-step graphs, which pad T, then drifted from eager steps in bf16).
REDUCE_PARTIALS = os.environ.get("LORAMUX_LORA_REDUCE_PARTIALS", "1") != "0"


@triton.jit
def _sum_partials_kernel(buf_ptr, n, P: tl.constexpr, BLOCK: tl.constexpr):
    # buf: fp32 [P + 1, n]; buf[P] = ((buf[0] + buf[1]) + ...) + buf[P - 1], in _partials_h's order
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.load(buf_ptr + offs, mask=ok, other=0.0)
    for p in tl.static_range(1, P):
        acc += tl.load(buf_ptr + p * n + offs, mask=ok, other=0.0)
    tl.store(buf_ptr + P * n + offs, acc, mask=ok)


def new_partials(x, a_stack, ranks, split_k: int | None = None) -> torch.Tensor:
    """Uninitialized fp32 [P (+1 for the sum, see REDUCE_PARTIALS), T, L*R] for shrink_partials (only real-rank
    cells get written and read). Apart from it so a caller can allocate on one stream and run the shrink on
    another (lora.lora_linear)."""
    T, K = x.shape
    L = ranks.shape[1]
    parts = shrink_plan(T, K, L, a_stack.shape[1] // L, x.device, split_k)["parts"]
    extra = int(REDUCE_PARTIALS and parts > 1 and T <= 256)
    return torch.empty(parts + extra, T, a_stack.shape[1], dtype=torch.float32, device=x.device)


def shrink_partials(x, a_stack, ranks, meta, buf, split_k: int | None = None) -> torch.Tensor:
    """add_lora's first launch into buf (from new_partials with the same split_k) -> what the expand reads: buf,
    or its last slice [1, T, L*R] holding the sum of the partials."""
    T, K = x.shape
    L = ranks.shape[1]
    plan = shrink_plan(T, K, L, a_stack.shape[1] // L, x.device, split_k)
    parts = plan["parts"]
    shrink(x, a_stack, ranks, meta, buf[:parts], plan)
    if buf.shape[0] == parts:
        return buf
    n = buf[0].numel()  # cells never written sum garbage that no expand reads
    _sum_partials_kernel[(cdiv(n, 1024),)](buf, n, P=parts, BLOCK=1024, num_warps=4)
    return buf[parts:]


from . import lora_fused_triton as _fused  # noqa: E402  (at the end: it imports this module's jit helpers)
