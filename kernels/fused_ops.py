"""Fused small decoder ops (residual add + RMSNorm, SiLU*mul): torch references and Triton/torch dispatch."""
from __future__ import annotations

import os

import torch

from .backend import resolve

ENABLE_ENV = "LORAMUX_FUSED_OPS"  # default on; "0" turns them off (the unfused path stays as the reference)
BACKEND_ENV = "LORAMUX_FUSED_OPS_BACKEND"  # "auto" | "triton" | "torch"


def enabled() -> bool:
    """Whether the model should use the fused ops; callers read it once, at construction."""
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """-> "triton" | "torch" (see backend.resolve; env LORAMUX_FUSED_OPS_BACKEND overrides "auto")."""
    return resolve(name, device, BACKEND_ENV, "fused-ops")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (+ residual [T, H]) -> (normed [T, H], new_residual). new_residual = x + residual in x's dtype
    (or x itself when residual is None); normed = weight * (fp32 RMSNorm of new_residual cast back to its dtype),
    i.e. exactly the model's unfused RMSNorm (HF LlamaRMSNorm semantics)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), x


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I] in the input dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _tri():
    from . import fused_ops_triton  # lazily: CPU installs without triton never import it

    return fused_ops_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm; same contract as rms_norm_reference (new tensors, inputs untouched)."""
    if resolve_backend(backend, x.device) == "torch":
        return rms_norm_reference(x, weight, eps, residual)
    return _tri().rms_norm(x, weight, eps, residual)


def silu_mul(gate_up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Fused silu(gate) * up; same contract as silu_mul_reference."""
    if resolve_backend(backend, gate_up.device) == "torch":
        return silu_mul_reference(gate_up)
    return _tri().silu_mul(gate_up)
