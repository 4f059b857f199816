"""LoRA under tensor parallelism: each rank writes its own shards of an adapter; rank 0's slot loads are mirrored."""
from __future__ import annotations

import dataclasses

from loramux.server.runner.lora_slots import LoRASlots

from .parallel_state import TPState
from .tp_layers import ShardPlan

# module -> (HF projection name used by ShardPlan.rows, parallel kind)
_KIND = {"q_proj": ("q", "col"), "k_proj": ("k", "col"), "v_proj": ("v", "col"), "gate_proj": ("gate", "col"),
         "up_proj": ("up", "col"), "o_proj": ("o", "row"), "down_proj": ("down", "row")}


def shard_adapter(adapter, plan: ShardPlan, head_dim: int):
    """Column-parallel targets: A [r, in] replicated, B [out, r] -> this rank's output rows. Row-parallel
    targets: A -> this rank's input columns, B replicated (the partial expands ride the layer's all-reduce)."""
    weights = {}
    for (layer, module), (a, b) in adapter.weights.items():
        name, kind = _KIND[module]
        lo, hi = plan.rows(name, head_dim)
        weights[(layer, module)] = (a, b[lo:hi]) if kind == "col" else (a[:, lo:hi], b)
    return dataclasses.replace(adapter, weights=weights, packed=None)


class TPLoRASlots(LoRASlots):
    """LoRASlots over a TPDecoderModel's local layers. On rank 0 (which owns the slot table and decides every
    load) start_load first sends ("load", slot, adapter) to the other ranks; every rank then writes its shards."""

    def __init__(self, model, num_slots: int, max_rank: int, dtype, device, table, tp: TPState):
        super().__init__(model, num_slots, max_rank, dtype, device, table, async_copies=False)
        self.tp, self.plan, self.head_dim = tp, model.plan, model.full_cfg.head_dim

    def start_load(self, slot: int, adapter) -> None:
        if self.tp.is_driver:
            adapter = adapter.unpacked() if getattr(adapter, "packed", None) is not None else adapter
            self.tp.broadcast_object(("load", slot, adapter))
        super().start_load(slot, shard_adapter(adapter, self.plan, self.head_dim))
