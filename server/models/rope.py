"""Rotary position embeddings: inverse frequencies for default/linear/dynamic/llama3 scaling, cos/sin cache."""
from __future__ import annotations

import math

import torch

from loramux.kernels.rope_kv import rotate_half_reference


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, max_pos: int,
                        max_model_len: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim/2] fp32, position divisor)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv, 1.0
    kind, factor = scaling["rope_type"], float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv, factor
    if kind == "dynamic":
        # Static NTK: scale the base once for the whole served context (the same for every sequence,
        # so results never depend on what else is in the batch). Identity within max_position_embeddings.
        if max_model_len > max_pos:
            base = theta * ((factor * max_model_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
            inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    # llama3: long wavelengths divided by factor, short kept, smooth blend in between.
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, blended, scaled), 1.0


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables [max_len, head_dim] fp32 ([freqs, freqs]) precomputed once; forward() rotates q/k (new
    tensors). The fused path (kernels.rope_kv) reads the same tables."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_pos: int, max_model_len: int,
                 device=None):
        super().__init__()
        inv, divisor = inverse_frequencies(head_dim, theta, scaling, max_pos, max_model_len)
        t = torch.arange(max(max_model_len, 1), dtype=torch.float32) / divisor
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(device), persistent=False)
        self.register_buffer("sin", emb.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H, D], k [T, Hkv, D] -> rotated (q, k) in q's dtype."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return rotate_half_reference(q, cos, sin), rotate_half_reference(k, cos, sin)
