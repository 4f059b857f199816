"""Megatron-style decoder shards: column-parallel qkv / gate_up, row-parallel o / down, vocab-parallel embedding."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loramux.server.models.layers import PackedLinear
from loramux.server.models.llama import DecoderModel
from loramux.server.models.model_config import ModelConfig, ModelLoadError
from loramux.server.models.weights import _LAYER_KEY, load_weights

from .parallel_state import TPState

log = logging.getLogger("loramux.distributed")


@dataclass(frozen=True)
class ShardPlan:
    """Which rows of each full (HF) tensor this rank holds; ranges are [start, end) in the full tensor."""

    rank: int
    world_size: int
    heads: int  # query heads per rank
    kv_heads: int  # KV heads per rank (1 when KV heads are replicated: fewer KV heads than ranks)
    kv_first: int  # this rank's first KV head
    inter: int  # intermediate size per rank
    vocab: int  # vocab rows per rank (ceil; the last rank's tail is zero padding)
    vocab_size: int  # full vocabulary

    def rows(self, module: str, head_dim: int) -> tuple[int, int]:
        r = self.rank
        if module in ("q", "o"):
            return r * self.heads * head_dim, (r + 1) * self.heads * head_dim
        if module in ("k", "v"):
            return self.kv_first * head_dim, (self.kv_first + self.kv_heads) * head_dim
        if module in ("gate", "up", "down"):
            return r * self.inter, (r + 1) * self.inter
        return r * self.vocab, min((r + 1) * self.vocab, self.vocab_size)  # embed / lm_head


def shard_plan(cfg: ModelConfig, rank: int, world_size: int) -> ShardPlan:
    tp, H, KV = world_size, cfg.num_heads, cfg.num_kv_heads
    if H % tp or cfg.intermediate_size % tp:
        raise ModelLoadError(f"--tensor-parallel-size {tp} must divide the attention heads ({H}) and the "
                             f"intermediate size ({cfg.intermediate_size})")
    if KV >= tp:
        if KV % tp:
            raise ModelLoadError(f"--tensor-parallel-size {tp} must divide the KV heads ({KV})")
        kv, first = KV // tp, rank * (KV // tp)
    else:  # fewer KV heads than ranks: each rank holds the one KV head its query heads use (replicated)
        if tp % KV:
            raise ModelLoadError(f"with {KV} KV heads, --tensor-parallel-size {tp} must be a multiple of {KV}")
        kv, first = 1, rank * KV // tp
    return ShardPlan(rank, tp, H // tp, kv, first, cfg.intermediate_size // tp, -(-cfg.vocab_size // tp),
                     cfg.vocab_size)


def local_config(cfg: ModelConfig, plan: ShardPlan) -> ModelConfig:
    return dataclasses.replace(cfg, num_heads=plan.heads, num_kv_heads=plan.kv_heads,
                               intermediate_size=plan.inter, vocab_size=plan.vocab)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; other ids look up zeros; the partial results are all-reduced."""

    def __init__(self, rows: int, hidden: int, start: int, tp: TPState, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, hidden, dtype=dtype, device=device), requires_grad=False)
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(x)


class RowParallelLinear(PackedLinear):
    """Input features sharded; y = all_reduce(x_r W_r^T + LoRA partial). The LoRA delta of a shard,
    B (s A_r x_r), is linear in the shrink, so its sum over ranks is B (s A x): it rides the same all-reduce."""

    def __init__(self, src: PackedLinear, tp: TPState):
        super().__init__(src.in_features, src.slice_sizes, src.bias is not None, src.weight.dtype, src.weight.device)
        self.tp = tp

    def forward(self, x, ctx):
        return self.tp.all_reduce(super().forward(x, ctx))


class TPDecoderModel(DecoderModel):
    """DecoderModel built on this rank's share of heads / intermediate / vocab; same forward and logits API."""

    def __init__(self, cfg: ModelConfig, max_model_len: int, dtype, device, tp: TPState):
        plan = shard_plan(cfg, tp.rank, tp.world_size)
        super().__init__(local_config(cfg, plan), max_model_len, dtype, device)
        self.full_cfg, self.plan, self.tp = cfg, plan, tp
        self.embed_tokens = VocabParallelEmbedding(plan.vocab, cfg.hidden_size, tp.rank * plan.vocab, tp, dtype,
                                                   device)
        for layer in self.layers:
            layer.o_proj = RowParallelLinear(layer.o_proj, tp)
            layer.down_proj = RowParallelLinear(layer.down_proj, tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head
        local = nn.functional.linear(hidden, w).float()
        return self.tp.all_gather_last(local)[:, :self.full_cfg.vocab_size]


def _shard(key: str, src: torch.Tensor, plan: ShardPlan, head_dim: int) -> torch.Tensor | None:
    """This rank's part of a full checkpoint tensor (None: a row-parallel bias held by rank 0 only)."""
    if key in ("model.embed_tokens.weight", "lm_head.weight"):
        lo, hi = plan.rows("vocab", head_dim)
        out = src.new_zeros(plan.vocab, src.shape[1])
        out[:hi - lo] = src[lo:hi]
        return out
    m = _LAYER_KEY.match(key)
    if m is None:
        return src  # norms: replicated
    module, kind = m.group(3), m.group(4)
    lo, hi = plan.rows(module, head_dim)
    if module in ("o", "down"):  # row-parallel: shard the input columns; the bias is added once (rank 0)
        return src[:, lo:hi] if kind == "weight" else (src if plan.rank == 0 else torch.zeros_like(src))
    return src[lo:hi]


def load_weights_tp(model: TPDecoderModel, model_dir: Path) -> None:
    """weights.load_weights, with each rank copying only its own shard of every tensor."""
    t0 = time.monotonic()
    load_weights(model, model_dir, transform=lambda key, src: _shard(key, src, model.plan, model.full_cfg.head_dim))
    log.info("rank %d/%d: loaded its weight shards in %.1fs", model.tp.rank, model.tp.world_size,
             time.monotonic() - t0)
