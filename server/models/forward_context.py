"""Per-step batch metadata that every layer reads (positions, KV slots, block tables, LoRA routing)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat KV-cache slot (block * block_size + offset)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    seq_lens_list: list[int] | None  # same, on the host; None in a CUDA-graph decode step
    query_lens: list[int] | None  # new tokens per sequence (sums to T); None = decode, one token each
    logits_indices: torch.Tensor  # [B'] int64, rows whose next-token logits are needed
    lora_meta: Any = None  # kernels.lora.LoRAMeta, or None when no token uses an adapter
    lora_backend: str = "torch"
    max_seq_len: int = 0  # static bound on seq_lens (graph-safe decode kernels size their grid by it)
    # Mixed-step CUDA graphs (runner/mixed_graphs.py): attention reads its work from these instead of host lists
    attn_cu_q: torch.Tensor | None = None  # [B+1] int32 cumulative query starts
    attn_work: torch.Tensor | None = None  # [E, 2] int32 (sequence, row tile) per program; (-1, -1) = padding
