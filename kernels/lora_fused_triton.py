"""Fused single-launch multi-LoRA kernel for small T (decode): shrink and expand in one program, no fp32 buffer.

At decode sizes (T <= 64) the two-launch path (lora_triton.shrink + expand) is bound by per-launch overhead, not
bytes, so one launch per linear group is worth recomputing a little. Work decomposition (grid of 2 axes):
  axis 0: column chunk of CH = BLOCK_N * N_ITERS columns inside one slice (lora_tiles_triton._slice_chunk, the same
          mapping as the expand kernel); fastest axis, so the programs that re-read one (slot, slice) of A
          from L2 run side by side;
  axis 1: BLOCK_M-row tile of one slot's token segment (lora_tiles_triton._segment_tile, the shrink/expand numbering);
          size cdiv(T, BLOCK_M) + min(S, T), from T and S only (CUDA-graph capturable).
Each program computes h = x[tile] @ A[slot, slice rows :rank]^T over the whole K (fp32 accumulate, only that
slice's A rows), then y[tile, chunk] += scale * h @ B[slot, chunk, :rank]^T, in place. Every y element is
written by exactly one program (no atomics, deterministic). Programs of slot >= S or rank 0 exit at once;
A/B rows past the rank are never loaded (masked), and rank tiles past the rank are skipped.

Cost model (why small T only, and why CH is moderate): without a second launch or atomics there is no split-K,
so each program streams its slice of A (rank x K) through one SM, and every column chunk of a slice recomputes the
same h, re-reading that A slice (from L2: DRAM sees it once): L2 traffic ~ tiles * N * rank * (K / CH + 1).
A program costs about rank * (K + CH) elements through one SM: at T = 1 (few programs: 12 for Llama-3-8B qkv
at CH = 512) a narrower CH barely shortens it (the A slice dominates) and a wider one lengthens it and idles
SMs; once many tiles share the GPU (T = 64, 8 adapters: 8 tiles x 56 gate_up chunks) a narrower CH multiplies
the A re-reads. CH = 512 (K / CH = 8 at K = 4096) is the middle; bench_lora_kernels.py --breakdown --sweep
times 256..2048. Past FUSED_MAX_RK A elements per program
(e.g. r = 64 at K = 14336: 1.8 MB through one SM) the stream costs more than the saved launch, so the heuristic
keeps the two-launch path there.
Layouts (inner dims contiguous): x [T, K], y [T, N] (any row stride), a [S, L*R, K], b [S, N, R] (compact
slot-slice blocks, lora_layout.py),
ranks int32 [S, L], scales fp32 [S, L].
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .backend import cdiv
from .lora_layout import row_align
from .lora_tiles_triton import _b_stride, _segment_tile, _slice_chunk, _tile_tokens, slice_chunks
from .lora_triton import _block_m, _dot_f32, _pow2

# Off by default: on the H100 (Llama-3-8B layer, CUDA graphs) this kernel took 1.5-2.7x the two-launch time at
# every decode shape measured (e.g. r=16, T=32, D=8: 98 vs 48 us per layer; docs/performance.md): one program
# streams its A slice over the full K alone, which costs more than the launch it saves. LORAMUX_FUSED_LORA=1
# turns the heuristic on for experiments; add_lora(fused=True) forces it.
ENABLED = os.environ.get("LORAMUX_FUSED_LORA", "") == "1"
FUSED_MAX_T = 64  # add_lora's heuristic (when ENABLED): fused for T <= this (decode / small mixed steps) ...
FUSED_MAX_RK = 64 * 4096  # ... and R * K <= this: the A elements one program streams alone (512 KB in bf16)
FUSED_MAX_R = 256  # at most 4 rank tiles of 64 (h0..h3 below)
FUSED_CHUNK = 512  # output columns per program


@triton.jit
def _h_tile(x_rows, row_ok, a_slice, r0, rank, K, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
            BLOCK_K: tl.constexpr, K_ITERS: tl.constexpr, DOT_F32: tl.constexpr):
    """h[m, j] = sum_k x[m, k] * a_slice[r0 + j, k] for r0 + j < rank (else 0) -> fp32 [BLOCK_M, BLOCK_R].
    x_rows: [BM, 1] row pointers; a_slice: the slot's slice of A (row 0 = rank 0). Tiles at/after rank: zeros."""
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if r0 < rank:
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < rank  # A rows past the rank (padding) are never loaded
        a_rows = a_slice + rr[:, None] * K  # [BR, 1]
        for ki in range(K_ITERS):
            kk = ki * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
            at = tl.load(a_rows + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # [BR, BK]
            if DOT_F32:
                h += tl.dot(xt.to(tl.float32), tl.trans(at).to(tl.float32), input_precision="ieee")
            else:
                h += tl.dot(xt, tl.trans(at))
    return h


@triton.jit
def _b_dot(acc, h, b_rows, n_ok, r0, rank, BLOCK_R: tl.constexpr, EXACT: tl.constexpr):
    """acc[m, n] += sum_j h[m, j] * B[n, r0 + j] over r0 + j < rank (b_rows [BN, 1]: the rows of the compact
    slot-slice block); acc unchanged past the rank."""
    if r0 < rank:
        rr = r0 + tl.arange(0, BLOCK_R)
        bt = tl.load(b_rows + rr[None, :], mask=n_ok[:, None] & (rr < rank)[None, :], other=0.0).to(tl.float32)
        # h stays fp32: exact for fp32 models, tf32 otherwise (as the expand kernel)
        if EXACT:
            acc += tl.dot(h, tl.trans(bt), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(bt), input_precision="tf32")
    return acc


@triton.jit
def _fused_kernel(x_ptr, a_ptr, b_ptr, y_ptr, ranks_ptr, scales_ptr, sorted_ptr, seg_start_ptr,
                  K, N, R, S, OFF1, OFF2, OFF3, sx_t, sy_t,
                  L: tl.constexpr, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  K_ITERS: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
                  N_ITERS: tl.constexpr, DOT_F32: tl.constexpr, EXACT: tl.constexpr, RA: tl.constexpr):
    # y[t, n] += scale[s, i] * sum_{j < rank[s, i]} (sum_k x[t, k] * a[s, i*R + j, k]) * B_si[n - lo_i, j]
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    sl, n0, n_hi, s_lo = _slice_chunk(pid_n, OFF1, OFF2, OFF3, N, BLOCK_N * N_ITERS)
    slot, row0, seg_hi = _segment_tile(pid_m, seg_start_ptr, S, S_POW2, BLOCK_M)
    if slot >= S:
        return
    rank = tl.load(ranks_ptr + slot * L + sl)
    if rank == 0:
        return
    scale = tl.load(scales_ptr + slot * L + sl)
    tok, row_ok = _tile_tokens(row0, seg_hi, sorted_ptr, BLOCK_M)  # [BM] token ids
    x_rows = x_ptr + tok[:, None] * sx_t  # [BM, 1]
    a_slice = a_ptr + (slot.to(tl.int64) * L + sl) * R * K  # this slot's A rows of slice sl
    # Phase 1: h [BM, R] in up to 4 register tiles of BLOCK_R (a list cannot be indexed; R_TILES is a constexpr,
    # so unused tiles compile away). Each tile streams its A rows once; tiles past the rank are skipped.
    h0 = _h_tile(x_rows, row_ok, a_slice, 0, rank, K, BLOCK_M, BLOCK_R, BLOCK_K, K_ITERS, DOT_F32)
    if R_TILES > 1:
        h1 = _h_tile(x_rows, row_ok, a_slice, BLOCK_R, rank, K, BLOCK_M, BLOCK_R, BLOCK_K, K_ITERS, DOT_F32)
    if R_TILES > 2:
        h2 = _h_tile(x_rows, row_ok, a_slice, 2 * BLOCK_R, rank, K, BLOCK_M, BLOCK_R, BLOCK_K, K_ITERS, DOT_F32)
    if R_TILES > 3:
        h3 = _h_tile(x_rows, row_ok, a_slice, 3 * BLOCK_R, rank, K, BLOCK_M, BLOCK_R, BLOCK_K, K_ITERS, DOT_F32)
    # Phase 2: y[tile, chunk] += scale * h @ B^T, BLOCK_N columns at a time (B chunk read once per program).
    b_blk = b_ptr + (slot.to(tl.int64) * N + s_lo) * R  # compact slot-slice block (lora_layout.py)
    stride = _b_stride(rank, RA)
    for it in range(N_ITERS):
        nn = n0 + it * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = nn < n_hi
        yp = y_ptr + tok[:, None] * sy_t + nn[None, :]
        m = row_ok[:, None] & n_ok[None, :]
        yv = tl.load(yp, mask=m, other=0.0).to(tl.float32)  # issued early: overlaps the B loads
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_rows = b_blk + (nn - s_lo)[:, None] * stride  # [BN, 1]
        acc = _b_dot(acc, h0, b_rows, n_ok, 0, rank, BLOCK_R, EXACT)
        if R_TILES > 1:
            acc = _b_dot(acc, h1, b_rows, n_ok, BLOCK_R, rank, BLOCK_R, EXACT)
        if R_TILES > 2:
            acc = _b_dot(acc, h2, b_rows, n_ok, 2 * BLOCK_R, rank, BLOCK_R, EXACT)
        if R_TILES > 3:
            acc = _b_dot(acc, h3, b_rows, n_ok, 3 * BLOCK_R, rank, BLOCK_R, EXACT)
        tl.store(yp, (yv + acc * scale).to(y_ptr.dtype.element_ty), mask=m)


def use_fused(T: int, K: int, R: int) -> bool:
    """add_lora's heuristic (host ints only): one fused launch for decode-sized T with a small A slice."""
    return ENABLED and T <= FUSED_MAX_T and R * K <= FUSED_MAX_RK and R <= FUSED_MAX_R


def fused_plan(T: int, K: int, R: int, dtype: torch.dtype = torch.bfloat16, chunk: int | None = None) -> dict:
    """Constexprs of a fused launch (host-only; sizes checked by compiling for sm_90: no spills). bk = 128 (64 for
    fp32: 3 pipeline stages of the fp32 A tile stay small); br = the rank in one tile up to 64, else tiles of 64;
    bn = 128 columns per B step (64 for fp32 or R > 64, whose B tiles would spill registers); chunk = columns
    per program (CH = bn * n_iters, default FUSED_CHUNK; see the module doc)."""
    br = min(64, _pow2(R))
    bk = max(16, min(64 if dtype == torch.float32 else 128, _pow2(K)))
    bn = 64 if dtype == torch.float32 or R > 64 else 128
    return dict(bm=_block_m(T), bk=bk, k_iters=cdiv(K, bk), br=br, r_tiles=cdiv(R, br), bn=bn,
                n_iters=max(1, (chunk or FUSED_CHUNK) // bn))


def fused_add_lora(y, x, a_stack, b_stack, ranks, scales, slice_offsets, meta, chunk: int | None = None) -> None:
    """y [T, N] += per-slot LoRA of x [T, K], one launch. Same contract as lora_triton.add_lora; chunk overrides
    the columns per program (benchmark sweeps)."""
    T, K = x.shape
    S, N, R = b_stack.shape
    L = ranks.shape[1]
    if T == 0 or R == 0:
        return
    if R > FUSED_MAX_R:
        raise ValueError(f"fused LoRA kernel supports max rank <= {FUSED_MAX_R}, got {R}")
    p = fused_plan(T, K, R, x.dtype, chunk)
    offs, chunks = slice_chunks(slice_offsets, p["bn"] * p["n_iters"])
    grid = (chunks, cdiv(T, p["bm"]) + min(S, T))
    _fused_kernel[grid](
        x, a_stack, b_stack, y, ranks, scales, meta.sorted_tokens, meta.seg_start, K, N, R, S, *offs,
        x.stride(0), y.stride(0),
        L=L, S_POW2=_pow2(S, 2), BLOCK_M=p["bm"], BLOCK_K=p["bk"], K_ITERS=p["k_iters"], BLOCK_R=p["br"],
        R_TILES=p["r_tiles"], BLOCK_N=p["bn"], N_ITERS=p["n_iters"], DOT_F32=_dot_f32(x.dtype),
        EXACT=y.dtype == torch.float32, RA=row_align(R), num_warps=4, num_stages=3)
