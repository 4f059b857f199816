"""Tile math shared by the multi-LoRA Triton kernels (lora_triton, lora_fused_triton, lora_mlp_triton,
lora_qkv_triton): which token tile and column chunk a program owns, and the expand-side delta of one tile."""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .backend import cdiv

# Experimental, off: the token-tile axis of the LoRA grids goes last (slowest), so the blocks of real tiles (always
# the lowest tile numbers) are dispatched first and the idle ones (the grid's bound covers one tile per slot: most
# exit at once when few adapters are in the step) after them, instead of interleaved with them.
TILES_SLOW = os.environ.get("LORAMUX_LORA_TILES_SLOW", "0") == "1"

# Work decomposition shared by the kernels. Tokens are grouped by slot (meta.sorted_tokens, meta.seg_start);
# each slot's segment is cut into BLOCK_M-row tiles and the tiles of all slots are numbered consecutively.
# One grid axis walks that numbering; its size is a host-side bound, cdiv(T, BLOCK_M) + min(S, T), which
# depends on T and S only (never on slot values), so launches can be captured in CUDA graphs. Programs past
# the real tile count, and (slot, slice) pairs with rank 0, exit at once. Loop trip counts are constexpr.
# Layouts (inner dims contiguous): x [T, K], y [T, N] (any row stride), a [S, L*R, K], b [S, N, R] with each
# slot-slice block compact (lora_layout.py: row stride = rank rounded up to RA), ranks int32 [S, L],
# scales fp32 [S, L], partial sums fp32 [P, T, L*R].


@triton.jit
def _tile_pid(axis_fast: tl.constexpr, axis_slow: tl.constexpr, TILES_SLOW: tl.constexpr):
    """(token-tile program id, other program id): the tile axis is axis_slow when TILES_SLOW, else axis_fast."""
    if TILES_SLOW:
        return tl.program_id(axis_slow), tl.program_id(axis_fast)
    return tl.program_id(axis_fast), tl.program_id(axis_slow)


def tile_grid(tiles: int, other: int) -> tuple[int, int]:
    """Host side of _tile_pid(0, 1, TILES_SLOW) for a 2-D grid of (token tiles, other)."""
    return (other, tiles) if TILES_SLOW else (tiles, other)


@triton.jit
def _segment_tile(pid, seg_start_ptr, S, S_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """-> (slot, first row in sorted order, end row of the slot's segment); slot >= S means no work."""
    s = tl.arange(0, S_POW2)
    lo = tl.load(seg_start_ptr + s, mask=s < S, other=0)  # [S_POW2]
    hi = tl.load(seg_start_ptr + s + 1, mask=s < S, other=0)
    return _pick_tile(pid, s, lo, hi, BLOCK_M)


@triton.jit
def _pick_tile(pid, s, lo, hi, BLOCK_M: tl.constexpr):
    """Tile `pid` of the groups' BLOCK_M-row tiles numbered in group order; group g spans sorted rows
    lo[g]..hi[g] ([G] each, s = arange(G)) -> (group, first row, end row); group >= G when pid is past them."""
    ntile = (hi - lo + BLOCK_M - 1) // BLOCK_M
    end = tl.cumsum(ntile, 0)  # inclusive tile count per slot
    slot = tl.sum((end <= pid).to(tl.int32), 0)
    sel = s == slot
    first = tl.sum(tl.where(sel, end - ntile, 0), 0)
    seg_lo = tl.sum(tl.where(sel, lo, 0), 0)
    seg_hi = tl.sum(tl.where(sel, hi, 0), 0)
    return slot, seg_lo + (pid - first) * BLOCK_M, seg_hi


@triton.jit
def _tile_tokens(row0, seg_hi, sorted_ptr, BLOCK_M: tl.constexpr):
    """Token ids (int64 [BM]) and row mask of the tile starting at sorted row row0 of a segment ending at seg_hi."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < seg_hi
    return tl.load(sorted_ptr + rows, mask=row_ok, other=0).to(tl.int64), row_ok


@triton.jit
def _table_tile(pid, tile_slot_ptr, tile_tok_ptr, BLOCK_M: tl.constexpr):
    """Tile `pid` from lora_meta's tile table (LORAMUX_LORA_TILE_TABLE) -> (group, token ids int64 [BM], row mask);
    both loads depend on nothing but pid, so they share one memory round trip."""
    slot = tl.load(tile_slot_ptr + pid)
    t = tl.load(tile_tok_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M))
    return slot, tl.maximum(t, 0).to(tl.int64), t >= 0


@triton.jit
def _slot_value(ptr, slot, col, L, S, S_POW2: tl.constexpr):
    """ptr[slot * L + col] (0 when slot >= S), read as a [S_POW2] vector that does not wait for slot and picked
    in registers: no round trip after the slot is known."""
    s = tl.arange(0, S_POW2)
    v = tl.load(ptr + s * L + col, mask=s < S, other=0)
    return tl.sum(tl.where(s == slot, v, tl.zeros_like(v)), 0)


@triton.jit
def _slice_chunk(pid, OFF1, OFF2, OFF3, N, CH):
    """Column chunk `pid` -> (slice, first column, slice end, slice start). Chunks of CH columns never straddle
    a slice boundary: slice i (columns OFFi..OFFi+1, OFF0 = 0, OFF4 = N; unused slices empty) has cdiv(width, CH)."""
    c1 = (OFF1 + CH - 1) // CH
    c2 = c1 + (OFF2 - OFF1 + CH - 1) // CH
    c3 = c2 + (OFF3 - OFF2 + CH - 1) // CH
    sl = (pid >= c1).to(tl.int32) + (pid >= c2).to(tl.int32) + (pid >= c3).to(tl.int32)
    c_lo = tl.where(sl == 0, 0, tl.where(sl == 1, c1, tl.where(sl == 2, c2, c3)))
    n_lo = tl.where(sl == 0, 0, tl.where(sl == 1, OFF1, tl.where(sl == 2, OFF2, OFF3)))
    n_hi = tl.where(sl == 0, OFF1, tl.where(sl == 1, OFF2, tl.where(sl == 2, OFF3, N)))
    return sl, n_lo + (pid - c_lo) * CH, n_hi, n_lo


def slice_chunks(slice_offsets, ch: int) -> tuple[list[int], int]:
    """Host side of _slice_chunk: -> (OFF1..OFF3, number of chunks) for slice_offsets (0, ..., N)."""
    N = slice_offsets[-1]
    offs = list(slice_offsets[1:-1]) + [N] * (5 - len(slice_offsets))
    return offs, sum(cdiv(hi - lo, ch) for lo, hi in zip([0] + offs, offs + [N]))


@triton.jit
def _partials_h(h_rows, rr, r_ok, row_ok, T, LR, NUM_PARTS: tl.constexpr):
    """Sum of the split-K partials in a fixed order (deterministic) -> fp32 [BM, BR]; h_rows: [BM, 1]."""
    h = tl.load(h_rows + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    for p in tl.static_range(1, NUM_PARTS):
        h += tl.load(h_rows + p * T * LR + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    return h


@triton.jit
def _first_h(h_rows, rank, row_ok, T, LR, NUM_PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
             R_TILES: tl.constexpr):
    """The whole rank's h when it fits one tile (loaded once per program, reused for every column tile)."""
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # R_TILES > 1: unused (_lora_delta sums per rank tile)
    if R_TILES == 1:
        rr = tl.arange(0, BLOCK_R)
        h = _partials_h(h_rows, rr, rr < rank, row_ok, T, LR, NUM_PARTS)
    return h


@triton.jit
def _b_stride(rank, RA: tl.constexpr):
    """Row stride of a slot-slice B block (lora_layout.b_row_stride): rank rounded up to a multiple of RA."""
    return tl.multiple_of((rank + RA - 1) // RA * RA, RA)


@triton.jit
def _lora_delta(h, h_rows, b_blk, n_rel, n_ok, rank, row_ok, T, LR, NUM_PARTS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr,
                EXACT: tl.constexpr, RA: tl.constexpr):
    """sum_j h[m, j] * B[n_rel, j] over j < rank -> fp32 [BM, BN] (unscaled); b_blk: the slot-slice's compact
    B block, n_rel: columns relative to the slice start. With R_TILES == 1, h is the caller's [BM, BR] (loaded
    once per program); else each rank tile's h is summed here from h_rows."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_rows = b_blk + n_rel[:, None] * _b_stride(rank, RA)  # [BN, 1]
    for ri in range(R_TILES):
        if ri * BLOCK_R < rank:  # rank tiles past the real rank are skipped
            rr = ri * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            if R_TILES > 1:
                h2 = _partials_h(h_rows, rr, r_ok, row_ok, T, LR, NUM_PARTS)
            else:
                h2 = h
            bt = tl.load(b_rows + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            # h stays fp32: exact for fp32 models, tf32 (10-bit mantissa, finer than bf16/fp16) otherwise
            if BLOCK_M == 1:  # one token (lora_meta.EXPAND_BM1): no dot below 16 rows; exact fp32 products
                acc += tl.sum(h2 * bt, axis=1)[None, :]  # [1, BR] * [BN, BR] -> [1, BN]
            elif EXACT:
                acc += tl.dot(h2, tl.trans(bt), input_precision="ieee")
            else:
                acc += tl.dot(h2, tl.trans(bt), input_precision="tf32")
    return acc
