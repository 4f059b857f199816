"""SlotCopy: the state of one asynchronous copy of an adapter into a GPU slot (server/runner/lora_slots.py)."""
from __future__ import annotations

import time
from concurrent.futures import Future

import torch


class SlotCopy:
    """One slot's copy in flight: staged (pageable packed adapters, on the copy thread), issued, done when its
    event has completed."""

    def __init__(self, adapter, after: torch.cuda.Event | None):
        self.adapter = adapter  # stays referenced until its copy has completed
        self.after = after  # the last queued step that reads the slot's old contents (None: none)
        self.staged: Future | None = None  # -> (pinned buffer, packed adapter over it) or (None, None)
        self.issued: Future | None = None
        self.done = torch.cuda.Event(enable_timing=True)
        self.start = torch.cuda.Event(enable_timing=True)
        self.keep: list[torch.Tensor] = []  # host staging tensors of this copy
        self.times = {"start": time.perf_counter()}  # + "staged", "issued" (host clock; LoRASlots.copy_trace)
