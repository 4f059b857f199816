"""A single-slice linear's LoRA expand (o_proj, down_proj) deferred into the residual add + RMSNorm after it.

In a decode step each of those expands is a separate ~launch-latency-bound kernel on the critical path, right
before a norm that reads the same rows anyway. linear_deferred runs the GEMM and the shrink and returns the
expand's inputs as a PendingExpand; add_norm (the next norm) applies it in the norm's own launch
(lora_norm_triton). Only on the Triton two-launch path and for T <= MAX_TOKENS (each row re-reads its slot's B,
which pays off only for decode-sized batches); otherwise linear_deferred returns the finished output and None.
Switch: LORAMUX_FUSED_LORA_NORM=1 turns it on (off by default until measured on a GPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import fused_ops
from . import lora_reference as _ref
from .lora import LoRAMeta, _two_launch, _up_to_expand, lora_linear

ENABLED = os.environ.get("LORAMUX_FUSED_LORA_NORM", "0") == "1"
MAX_TOKENS = 64


@dataclass
class PendingExpand:
    """The expand of one single-slice LoRA linear, not yet added to its output."""

    buf: torch.Tensor  # fp32 [P, T, R] split-K partials of the shrink
    b: torch.Tensor  # [S, N, R] compact B blocks
    ranks: torch.Tensor  # int32 [S, 1]
    scales: torch.Tensor  # fp32 [S, 1]
    meta: LoRAMeta


def linear_deferred(x, weight, bias, a_stack, b_stack, ranks, scales, slice_offsets, meta, backend="auto",
                    enabled: bool | None = None) -> tuple[torch.Tensor, PendingExpand | None]:
    """-> (y, pending): y = x W^T (+ bias) plus the LoRA delta, or without it and `pending` to pass to add_norm."""
    offs = tuple(slice_offsets)
    enabled = ENABLED if enabled is None else enabled
    if not (enabled and len(offs) == 2 and x.shape[0] <= MAX_TOKENS
            and _two_launch(x, a_stack, ranks, meta, backend)):
        return lora_linear(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta, backend), None
    y, buf, b_stack, ranks, scales = _up_to_expand(x, weight, bias, a_stack, b_stack, ranks, scales, offs, meta,
                                                   None)
    return y, PendingExpand(buf, b_stack, ranks, scales, meta)


def add_norm(x, residual, weight, eps, pending: PendingExpand | None, backend="auto"):
    """(normed, new residual stream) of x (+ pending's delta) + residual, as fused_ops.rms_norm."""
    if pending is None:
        return fused_ops.rms_norm(x, weight, eps, residual, backend=backend)
    from . import lora_norm_triton

    p = pending
    return lora_norm_triton.expand_add_norm(x, p.buf, p.b, p.ranks, p.scales, p.meta.token_slots, weight, eps,
                                            residual)


def expand_add_norm_reference(y, buf, b_stack, ranks, scales, meta, weight, eps, residual):
    """The unfused chain: lora_reference.expand into y (in place), then fused_ops.rms_norm_reference.
    buf: fp32 [P, T, R] partials (summed in order first) or [T, R]."""
    h = buf if buf.dim() == 2 else buf.sum(0)
    _ref.expand(y, h, b_stack, ranks, scales, (0, y.shape[1]), meta)
    return fused_ops.rms_norm_reference(y, weight, eps, residual)
