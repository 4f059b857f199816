"""Triton: a single-slice LoRA expand (o_proj, down_proj) fused into the residual add + RMSNorm that follows it, so
a decode step with adapters launches no separate expand for those two linears (kernels.lora_norm).

Unfused, the chain is: expand (y[t] += scale * h[t] @ B^T in place, rounded to y's dtype), then
fused_ops.rms_norm(y, w, eps, residual). Here one program per row does both: pass 1 adds the row's delta and the
residual chunk by chunk (each sum rounded to y's dtype as the unfused chain rounds it), writes the new residual
stream and sums its squares; pass 2 reads the row back (L1/L2) and writes the normed row. The delta is a plain
fp32 multiply-add over the rank (no tensor cores: one row per program), so it is at least as exact as the
expand's tf32 dot; results equal the unfused chain to rounding, not bit for bit.
Each program reads its slot's B block [H, rank] (L2-resident across the rows of a slot), so the fusion pays for
decode-sized T only; lora_norm.MAX_TOKENS bounds it. Layouts: y, residual [T, H] (any row stride), buf fp32
[P, T, R] split-K partials of the shrink (L = 1), b [S, H, R] compact blocks (lora_layout.py), ranks int32
[S, 1], scales fp32 [S, 1], token_slots int32 [T] (-1 = no adapter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, next_pow2
from .fused_ops_triton import _cast, _rne_bf16
from .lora_layout import row_align
from .lora_tiles_triton import _b_stride


@triton.jit
def _row_delta(buf_ptr, b_rows, cols, col_ok, rank, row, T, R, NUM_PARTS: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr, R_TILES: tl.constexpr):
    """sum_j h[row, j] * B[cols, j] over j < rank -> fp32 [BLOCK_N]; h = the split-K partials summed in order."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for ri in range(R_TILES):
        if ri * BLOCK_R < rank:  # rank tiles past the real rank are skipped
            rr = ri * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            h = tl.load(buf_ptr + row * R + rr, mask=r_ok, other=0.0)
            for p in tl.static_range(1, NUM_PARTS):
                h += tl.load(buf_ptr + p * T * R + row * R + rr, mask=r_ok, other=0.0)
            bt = tl.load(b_rows + rr[None, :], mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(bt * h[None, :], axis=1)
    return acc


@triton.jit
def _expand_add_norm_kernel(y_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, buf_ptr, b_ptr, slots_ptr, ranks_ptr,
                            scales_ptr, s_y, s_r, s_o, s_ro, T, H, R, eps,
                            NUM_PARTS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                            N_CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr, R_TILES: tl.constexpr,
                            RA: tl.constexpr, RNE_BF16: tl.constexpr):
    # new_res[t] = round(round(y[t] + scale * h[t] @ B^T) + residual[t]); out[t] = RMSNorm(new_res[t]) * w
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    has = slot >= 0
    slot = tl.where(has, slot, 0).to(tl.int64)
    rank = tl.load(ranks_ptr + slot, mask=has, other=0)
    scale = tl.load(scales_ptr + slot, mask=has, other=0.0)
    stride = _b_stride(rank, RA)
    DTYPE = y_ptr.dtype.element_ty
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(N_CHUNKS):  # pass 1: delta + residual, new residual stream, sum of squares
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = cols < H
        v = tl.load(y_ptr + row * s_y + cols, mask=ok, other=0.0).to(tl.float32)
        if rank > 0:
            b_rows = b_ptr + slot * H * R + cols[:, None] * stride  # [BN, 1] rows of the compact block
            d = _row_delta(buf_ptr, b_rows, cols, ok, rank, row, T, R, NUM_PARTS, BLOCK_N, BLOCK_R, R_TILES)
            v = _cast(v + d * scale, DTYPE, RNE_BF16).to(tl.float32)
        if HAS_RES:
            r = tl.load(r_ptr + row * s_r + cols, mask=ok, other=0.0).to(tl.float32)
            v = _cast(v + r, DTYPE, RNE_BF16).to(tl.float32)
        tl.store(res_out_ptr + row * s_ro + cols, v.to(DTYPE), mask=ok)
        sq += v * v
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / H + eps)
    tl.debug_barrier()  # pass 2 reads what pass 1 stored
    for c in range(N_CHUNKS):  # pass 2: the normed row, rounded as fused_ops' rms_norm rounds it
        cols = c * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = cols < H
        v = tl.load(res_out_ptr + row * s_ro + cols, mask=ok, other=0.0).to(tl.float32)
        n = _cast(v * rstd, DTYPE, RNE_BF16).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * s_o + cols, _cast(n * w, out_ptr.dtype.element_ty, RNE_BF16), mask=ok)


def expand_add_norm(y, buf, b_stack, ranks, scales, token_slots, weight, eps: float,
                    residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (normed [T, H], new residual stream [T, H]) as lora_norm.expand_add_norm_reference. y [T, H] is the
    linear's base output; without a residual it becomes the stream (updated in place, as the unfused expand does),
    else it is left untouched. buf fp32 [P, T, R]; token_slots int32 [>= T] (the step's LoRAMeta.token_slots)."""
    T, H = y.shape
    S, _, R = b_stack.shape
    if y.stride(1) != 1:
        raise ValueError("y must have a unit stride in its last dimension")
    out = torch.empty(T, H, dtype=torch.promote_types(weight.dtype, y.dtype), device=y.device)
    if residual is not None:
        if residual.shape != y.shape or residual.dtype != y.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match y {tuple(y.shape)}")
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
        new_res = torch.empty_like(y)
    else:
        new_res = y
    if T == 0:
        return out, new_res
    br = min(16, next_pow2(R))
    bn = min(512, next_pow2(H))
    r = residual if residual is not None else y
    _expand_add_norm_kernel[(T,)](
        y, r, weight.contiguous(), out, new_res, buf, b_stack, token_slots, ranks, scales, y.stride(0), r.stride(0),
        out.stride(0), new_res.stride(0), T, H, R, float(eps), NUM_PARTS=buf.shape[0], HAS_RES=residual is not None,
        BLOCK_N=bn, N_CHUNKS=cdiv(H, bn), BLOCK_R=br, R_TILES=cdiv(R, br), RA=row_align(R),
        RNE_BF16=_rne_bf16(y, out), num_warps=8)  # one row per SM at decode sizes: more loads in flight
    return out, new_res
