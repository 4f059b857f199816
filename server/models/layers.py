"""Building blocks of the decoder: RMSNorm and the LoRA-aware packed linear layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loramux.kernels import fused_ops
from loramux.kernels.rope_kv import rope_write_kv

from .forward_context import ForwardContext


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        # fused ops on (LORAMUX_FUSED_OPS, default 1; read once, here): the decoder calls fused(), not forward()
        self.fused_backend = fused_ops.resolve_backend("auto", device) if fused_ops.enabled() else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new_residual) with new_residual = x + residual (x when None); see kernels.fused_ops."""
        return fused_ops.rms_norm(x, self.weight, self.eps, residual, backend=self.fused_backend or "auto")


@dataclass
class LoRAStacks:
    """Device-resident adapter weights of one packed linear for all slots (see kernels.lora.add_lora)."""

    a: torch.Tensor  # [S, L*R, K]
    b: torch.Tensor  # [S, N, R]: slot-slice [w, rank] blocks stored compactly (kernels/lora_layout.py)
    ranks: torch.Tensor  # [S, L] int32 (0 = slice not targeted in that slot)
    scales: torch.Tensor  # [S, L] fp32


class PackedLinear(nn.Module):
    """y = x W^T (+ b) for several projections packed along the output (q|k|v, gate|up), plus per-token LoRA."""

    def __init__(self, in_features: int, slice_sizes: list[int], bias: bool, dtype, device):
        super().__init__()
        self.in_features = in_features
        self.slice_sizes = list(slice_sizes)
        self.slice_offsets = tuple([0] + list(torch.tensor(slice_sizes).cumsum(0).tolist()))
        n = self.slice_offsets[-1]
        self.weight = nn.Parameter(torch.empty(n, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.lora: LoRAStacks | None = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.lora is None or ctx.lora_meta is None:
            return nn.functional.linear(x, self.weight, self.bias)
        from loramux.kernels.lora import lora_linear

        st = self.lora
        return lora_linear(x, self.weight, self.bias, st.a, st.b, st.ranks, st.scales, self.slice_offsets,
                           ctx.lora_meta, backend=ctx.lora_backend)

    def rope_write_kv(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple, backend: str) -> torch.Tensor:
        """q of this q|k|v linear's output, rotated, k/v written to the cache (fused-ops path; rope: the args of
        kernels.rope_kv.rope_write_kv after qkv); with adapters, through kernels.lora.qkv_rope_kv."""
        if self.lora is None or ctx.lora_meta is None:
            return rope_write_kv(nn.functional.linear(x, self.weight, self.bias), *rope, backend=backend)
        from loramux.kernels.lora import qkv_rope_kv

        st = self.lora
        return qkv_rope_kv(x, self.weight, self.bias, st.a, st.b, st.ranks, st.scales, self.slice_offsets,
                           ctx.lora_meta, rope, backend=ctx.lora_backend, rope_backend=backend)

    def silu_mul(self, x: torch.Tensor, ctx: ForwardContext, backend: str) -> torch.Tensor:
        """silu(gate) * up of this gate|up linear's output (fused-ops path); with adapters in the step, through
        kernels.lora.gate_up_silu (which can fuse the LoRA expand with the SiLU*mul)."""
        if self.lora is None or ctx.lora_meta is None:
            return fused_ops.silu_mul(nn.functional.linear(x, self.weight, self.bias), backend=backend)
        from loramux.kernels.lora import gate_up_silu

        st = self.lora
        return gate_up_silu(x, self.weight, self.bias, st.a, st.b, st.ranks, st.scales, self.slice_offsets,
                            ctx.lora_meta, backend=ctx.lora_backend, silu_backend=backend)
