"""Counter-based sampling noise: a 32-bit integer mixer keyed by (seed, output position) and token id, so a
request's draw never depends on its batch, the vocabulary order or the device (kernels/sampling_triton.py
computes the same bits in one fused pass)."""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
# Multipliers of the 32-bit mixer; both < 2**31, so x * C < 2**63 never overflows int64.
_C1, _C2 = 0x7FEB352D, 0x31848BAB


def _mix32_int(x: int) -> int:
    """Python twin of _mix32 (used for the per-row keys)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit integer hash of an int64 tensor holding values in [0, 2**32)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_C1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_C2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def row_keys(seed: int, output_index: int) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, output position): the whole noise stream of that sampling step."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    k1 = _mix32_int((s & _M32) + output_index * 0x9E3779B1)  # distinct positions never share a key
    # k2 must not be a plain function of k1 that cancels in gumbel_noise's mix(id ^ k1) ^ k2.
    return k1, _mix32_int(((s >> 32) + 0x7F4A7C15) ^ _mix32_int(k1 ^ 0x5BD1E995))


def gumbel_noise(token_ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, C] for token ids ([C] or [B, C], int64) and per-row keys [B, 2].

    Counter-based: the value for a token depends only on (its row's keys, its id), so any subset or order
    of the vocabulary, and any batch, sees the same noise for it.
    """
    x = token_ids ^ keys[:, 0:1]
    _mix32(x).bitwise_xor_(keys[:, 1:2])
    _mix32(x)
    u = ((x >> 9).float() + 0.5) * (2.0 ** -23)  # in [2**-24, 1 - 2**-24]: both logs stay finite
    return u.log_().neg_().log_().neg_()
