"""Triton kernels for fused residual add + RMSNorm and SiLU*mul (one pass over each row, fp32 math)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import cdiv, interpreter_on, next_pow2


@triton.jit
def _cast(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    # fp32 -> dtype rounding to nearest even. The Triton interpreter truncates fp32 -> bf16 casts (GPUs round),
    # so under TRITON_INTERPRET=1 bf16 rounding is done on the bits first (RNE_BF16); GPUs take the plain cast.
    if RNE_BF16 and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, s_x, s_r, s_o, s_ro, H, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    # one program per row; the sum is rounded to x's dtype before the norm, as the unfused model does
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * s_r + cols, mask=mask, other=0.0)
        x = _cast(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, RNE_BF16)
        tl.store(res_out_ptr + row * s_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = _cast(xf * rstd, x_ptr.dtype.element_ty, RNE_BF16).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_o + cols, _cast(y * w, out_ptr.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, s_gu, s_o, I, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    # grid (T, cdiv(I, BLOCK)); silu in fp32, rounded to the input dtype before the multiply (as torch does)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gu_ptr + row * s_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * s_gu + I + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = _cast(gf / (1.0 + tl.exp(-gf)), gu_ptr.dtype.element_ty, RNE_BF16).to(tl.float32)
    tl.store(out_ptr + row * s_o + cols, _cast(s * u.to(tl.float32), out_ptr.dtype.element_ty, RNE_BF16), mask=mask)


def _rne_bf16(*ts: torch.Tensor) -> bool:
    return interpreter_on() and any(t.dtype == torch.bfloat16 for t in ts)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (+ residual [T, H]) -> (normed, new_residual); see fused_ops.rms_norm_reference."""
    assert x.dim() == 2 and weight.shape == (x.shape[1],), (x.shape, weight.shape)
    x, weight = _rows(x), weight.contiguous()
    T, H = x.shape
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(T, H, dtype=out_dtype, device=x.device)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
        residual = _rows(residual)
        new_res = torch.empty_like(x)
    else:
        new_res = x
    if T == 0:
        return out, new_res
    block = next_pow2(H)
    warps = max(1, min(16, block // 256))
    r = residual if residual is not None else x
    _rms_norm_kernel[(T,)](x, r, weight, out, new_res, x.stride(0), r.stride(0), out.stride(0),
                           new_res.stride(0), H, float(eps), HAS_RES=residual is not None, BLOCK=block,
                           RNE_BF16=_rne_bf16(x, out), num_warps=warps)
    return out, new_res


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I]; see fused_ops.silu_mul_reference."""
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0, gate_up.shape
    gate_up = _rows(gate_up)
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, I, dtype=gate_up.dtype, device=gate_up.device)
    if T == 0:
        return out
    block = min(1024, next_pow2(I))
    _silu_mul_kernel[(T, cdiv(I, block))](gate_up, out, gate_up.stride(0), out.stride(0), I, BLOCK=block,
                                                 RNE_BF16=_rne_bf16(gate_up), num_warps=4)
    return out
