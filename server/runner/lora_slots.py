"""Device-resident LoRA slots: per-layer stacked A/B buffers for --max-loras adapters, and the per-step meta."""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loramux.kernels.lora import LoRAMeta, build_lora_meta
from loramux.kernels.lora_layout import b_block
from loramux.server.models.layers import LoRAStacks
from loramux.server.models.llama import LORA_TARGETS
from loramux.server.runner.pinned_staging import PinnedStaging
from loramux.server.runner.slot_copy import SlotCopy

_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRASlots:
    """Allocates the stacks once per packed linear group, over all layers (A [layers, S, L*R, K], B [layers, S,
    N, R] holding compact [w, r] blocks (kernels/lora_layout.py), ranks / scales [layers, S, L]), and attaches
    each layer's contiguous view [S, ...] to the model's PackedLinear layers; load() writes one adapter into one
    slot. `table` maps ids to slots. Holding every layer in one tensor lets a packed adapter (adapters.packed)
    land with one strided copy per module.

    On CUDA, start_load() issues the copies on a separate stream, after the queued steps that read the slot
    (note_use; from the caller's thread for a pinned packed adapter, else from a worker thread), and records an
    event; ready(slot) polls it (never blocks). On CPU (or with async_copies=False) start_load() copies at once
    and the slot is ready when it returns."""

    def __init__(self, model, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device, table,
                 async_copies: bool | None = None):
        self.model, self.num_slots, self.max_rank, self.table = model, num_slots, max_rank, table
        self.device = torch.device(device)
        self.stacks: dict[str, LoRAStacks] = {}  # group -> stacks over all layers (leading dim = layer)
        n_layers = len(model.layers)
        for attr in _LINEARS:
            lin = getattr(model.layers[0], attr)
            L, K, N = len(lin.slice_sizes), lin.in_features, lin.slice_offsets[-1]
            st = self.stacks[attr] = LoRAStacks(
                a=torch.zeros(n_layers, num_slots, L * max_rank, K, dtype=dtype, device=device),
                b=torch.zeros(n_layers, num_slots, N, max_rank, dtype=dtype, device=device),
                ranks=torch.zeros(n_layers, num_slots, L, dtype=torch.int32, device=device),
                scales=torch.zeros(n_layers, num_slots, L, dtype=torch.float32, device=device))
            for i, layer in enumerate(model.layers):
                getattr(layer, attr).lora = LoRAStacks(st.a[i], st.b[i], st.ranks[i], st.scales[i])
        self.nbytes = sum(st.a.nbytes + st.b.nbytes for st in self.stacks.values())
        self._meta: LoRAMeta | None = None
        self.async_copies = self.device.type == "cuda" if async_copies is None else async_copies
        self._inflight: dict[int, SlotCopy] = {}
        self._lock = threading.Lock()
        self._stream = self._pool = None
        self._staging = None
        if self.async_copies:
            self._stream = torch.cuda.Stream(self.device)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-copy")  # FIFO: copies in order
            self._staging = PinnedStaging(2)  # pageable packed adapters pass through it (2: one copy overlaps)
        self.last_copy_seconds = 0.0  # device time of the last completed copy (CUDA) or its wall time (CPU)
        # totals for benchmarks: copy-thread seconds staging into pinned memory / issuing, copy device seconds
        self.copy_seconds = {"staging": 0.0, "issue": 0.0, "device": 0.0}
        # per completed async copy, host seconds from start_load to staged / issued / seen done, and its device time
        self.copy_trace: deque[dict[str, float]] = deque(maxlen=4096)
        self.last_use: dict[int, torch.cuda.Event] = {}  # slot -> recorded after the last queued step reading it

    def note_use(self, token_slots: list[int]) -> None:
        """After queueing a step whose tokens use these slots (-1 = none; async copies only): later copies into
        them wait for this step."""
        if self.async_copies:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.last_use.update(dict.fromkeys(set(token_slots) - {-1}, event))

    def slot_of(self, adapter_id: str) -> int:
        slot = self.table.lookup(adapter_id)
        return -1 if slot is None else slot

    def load(self, slot: int, adapter) -> None:
        """Copy a LoadedAdapter into `slot` and wait until the copy has completed (blocking; see start_load)."""
        self.start_load(slot, adapter)
        while not self.ready(slot):
            time.sleep(0.0002)

    def start_load(self, slot: int, adapter) -> None:
        """Begin copying a LoadedAdapter's (A [r, in], B [out, r], scale) into `slot`; the caller must not use the
        slot until ready(slot). The slot must be unused by running requests (free, or idle and taken over)."""
        if not self.async_copies:
            t0 = time.perf_counter()
            self._write(slot, adapter, None)
            self.last_copy_seconds = time.perf_counter() - t0
            return
        # Queued steps that read the old contents: only those of self.last_use, not all the queued work, so a copy
        # into a slot idle for a step or more runs beside the step in flight instead of after it.
        copy = SlotCopy(adapter, self.last_use.get(slot))
        packed = getattr(adapter, "packed", None)
        if packed is not None and self._fits(packed):
            # ~22 non-blocking copies from page-locked memory are issued on this (the engine) thread, in well under
            # a millisecond: on a worker thread each of them waited for the busy engine thread's GIL (~77 ms per
            # adapter on the H100). Only the memcpy of a pageable adapter into pinned memory runs on the copy
            # thread (one call), and the next ready() poll issues the copies.
            if packed.is_pinned:
                copy.staged = Future()
                copy.staged.set_result((None, packed))
                copy.times["staged"] = copy.times["start"]
            else:
                copy.staged = self._pool.submit(self._stage, packed, copy.times)
        else:  # tensor-by-tensor copies block the issuing thread: keep them off the engine thread
            copy.issued = self._pool.submit(self._issue, slot, copy)
        with self._lock:
            self._inflight[slot] = copy
        self._issue_staged()

    def _stage(self, packed, times: dict) -> tuple:
        """On the copy thread: (reused pinned buffer, the adapter copied into it), or (None, None) when page-locked
        memory is exhausted."""
        t0 = time.perf_counter()
        try:
            buf = self._staging.acquire(packed.buffer.numel())  # waits for that buffer's previous copy
        except RuntimeError:
            return None, None
        try:
            return buf, packed.copied_to(buf.data)
        except BaseException:
            self._staging.release(buf, None)
            raise
        finally:
            times["staged"] = time.perf_counter()
            self.copy_seconds["staging"] += times["staged"] - t0

    def _issue_staged(self) -> None:
        """Issue, on the calling (engine) thread, every copy whose adapter is now in page-locked memory."""
        with self._lock:
            todo = [(s, c) for s, c in self._inflight.items() if c.issued is None and c.staged.done()]
        for slot, copy in todo:
            if copy.staged.exception() is not None:
                copy.issued = copy.staged
                continue
            buf, staged = copy.staged.result()
            if staged is None:  # no page-locked memory: blocking copies from pageable memory, off this thread
                copy.issued = self._pool.submit(self._issue, slot, copy)
                continue
            copy.issued = Future()
            try:
                self._issue(slot, copy, staged, buf)
                copy.issued.set_result(None)
            except Exception as exc:  # reported by ready(), like a failure on the copy thread
                copy.issued.set_exception(exc)

    def _issue(self, slot: int, copy: SlotCopy, staged=None, buf=None) -> None:
        """Queue the copies on the copy stream after the last queued step that reads the slot (copy.after); a
        staged (pinned) packed adapter as ~22 strided copies, anything else tensor by tensor."""
        t0 = copy.times["issued"] = time.perf_counter()
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                if copy.after is not None:
                    self._stream.wait_event(copy.after)
                copy.start.record(self._stream)
                if staged is not None:
                    self._write_packed(slot, staged, True)
                else:
                    self._write(slot, copy.adapter, copy.keep)
                copy.done.record(self._stream)
        finally:
            self.copy_seconds["issue"] += time.perf_counter() - t0
            if buf is not None:
                self._staging.release(buf, copy.done)

    def ready(self, slot: int) -> bool:
        """True when no copy into `slot` is in flight (never blocks); raises if issuing the copy failed."""
        with self._lock:
            copy = self._inflight.get(slot)
        if copy is None:
            return True
        self._issue_staged()
        if copy.issued is None or not copy.issued.done():
            return False
        if copy.issued.exception() is not None:  # issuing failed: the slot holds garbage; the caller drops it
            with self._lock:
                self._inflight.pop(slot, None)
            raise copy.issued.exception()
        if not copy.done.query():
            return False
        self.last_copy_seconds = copy.start.elapsed_time(copy.done) / 1000.0
        self.copy_seconds["device"] += self.last_copy_seconds
        t = copy.times
        self.copy_trace.append({"staged": t.get("staged", t["issued"]) - t["start"], "issued": t["issued"] - t["start"],
                                "seen_done": time.perf_counter() - t["start"], "device": self.last_copy_seconds})
        with self._lock:
            if self._inflight.get(slot) is copy:
                del self._inflight[slot]
        return True

    def wait_for(self, event, poll_s: float = 2e-4) -> None:
        """Block until `event` (a step's tokens) completes; while copies wait for their staging, poll instead and
        issue each as soon as it is staged, so it runs during this step rather than after the next step boundary
        (one step less for a cold adapter's first token)."""
        while not event.query():
            with self._lock:
                waiting = any(c.issued is None for c in self._inflight.values())
            if not waiting:
                event.synchronize()
                return
            self._issue_staged()
            time.sleep(poll_s)

    def in_flight(self) -> list[int]:
        with self._lock:
            return list(self._inflight)

    def _write(self, slot: int, adapter, keep: list | None) -> None:
        """Copy into the slot: the packed form when it fits this model (a few copies per module), else tensor by
        tensor. With `keep` (async copies) the copies are non-blocking from pinned memory."""
        packed = getattr(adapter, "packed", None)
        if packed is not None and self._fits(packed):
            self._write_packed(slot, packed, keep is not None and packed.is_pinned)
        else:
            self._write_tensors(slot, adapter, keep)

    def _fits(self, packed) -> bool:
        if packed.num_layers != len(self.model.layers):
            return False
        lin0 = self.model.layers[0]
        for m, a in packed.a.items():
            attr, i = LORA_TARGETS[m]
            lin = getattr(lin0, attr)
            size = lin.slice_offsets[i + 1] - lin.slice_offsets[i]
            if a.shape[1] > self.max_rank or a.shape[2] != lin.in_features or packed.b[m].shape[1] != size:
                return False
        return all(packed.ranks[g].shape[1] == len(getattr(lin0, g).slice_sizes) for g in packed.ranks)

    def _write_packed(self, slot: int, packed, nb: bool) -> None:
        """One strided copy per module for A and for B, one per group for ranks and scales (Llama: 22). Groups
        the adapter does not target get rank 0; padding past each rank is never read, so it is not cleared."""
        R = self.max_rank
        for m, a in packed.a.items():
            attr, i = LORA_TARGETS[m]
            st, r = self.stacks[attr], a.shape[1]
            lin = getattr(self.model.layers[0], attr)
            lo, hi = lin.slice_offsets[i], lin.slice_offsets[i + 1]
            st.a[:, slot, i * R:i * R + r].copy_(a, non_blocking=nb)
            layer_ranks = packed.ranks[attr][:, i]  # [layers]; below r only with a rank_pattern
            if bool((layer_ranks == r).all()):
                b_block(st.b[:, slot], lo, hi, r).copy_(packed.b[m], non_blocking=nb)  # compact [w, r] per layer
            else:  # each layer's block has its own row stride (kernels/lora_layout.py)
                for layer, rl in enumerate(layer_ranks.tolist()):
                    b_block(st.b[layer, slot], lo, hi, rl).copy_(packed.b[m][layer, :, :rl], non_blocking=nb)
        for attr, st in self.stacks.items():
            if attr in packed.ranks:
                st.ranks[:, slot].copy_(packed.ranks[attr], non_blocking=nb)
                st.scales[:, slot].copy_(packed.scales[attr], non_blocking=nb)
            else:
                st.ranks[:, slot].zero_()
                st.scales[:, slot].zero_()

    def _write_tensors(self, slot: int, adapter, keep: list | None) -> None:
        """Untargeted slices get rank 0 (padding past each rank is never read by the kernels, so it need not be
        cleared). With `keep` (async copies), host tensors are pinned and kept alive until the copy completes."""
        layers = self.model.layers
        ranks = torch.zeros(len(layers), len(_LINEARS), 3, dtype=torch.int32)
        scales = torch.zeros(len(layers), len(_LINEARS), 3, dtype=torch.float32)
        R, nb = self.max_rank, keep is not None
        for (layer_idx, module), (a, b) in adapter.weights.items():
            attr, i = LORA_TARGETS[module]
            lin = getattr(layers[layer_idx], attr)
            st, r = lin.lora, a.shape[0]
            lo, hi = lin.slice_offsets[i], lin.slice_offsets[i + 1]
            st.a[slot, i * R:i * R + r].copy_(a, non_blocking=nb)
            b_block(st.b[slot], lo, hi, r).copy_(b, non_blocking=nb)
            ranks[layer_idx, _LINEARS.index(attr), i] = r
            scales[layer_idx, _LINEARS.index(attr), i] = adapter.scales[(layer_idx, module)]
        if nb:
            ranks, scales = ranks.pin_memory(), scales.pin_memory()
            keep += [ranks, scales]
        for j, (attr, st) in enumerate(self.stacks.items()):
            L = st.ranks.shape[2]
            st.ranks[:, slot].copy_(ranks[:, j, :L], non_blocking=nb)
            st.scales[:, slot].copy_(scales[:, j, :L], non_blocking=nb)

    def build_meta(self, token_slots: torch.Tensor) -> LoRAMeta:
        """Group this step's tokens by slot, reusing one preallocated buffer set when it is big enough."""
        T = token_slots.shape[0]
        if self._meta is None or self._meta.max_tokens < T:
            self._meta = LoRAMeta.empty(max(T, 256), self.num_slots, self.device)
        return build_lora_meta(token_slots, self.num_slots, out=self._meta)

    def close(self) -> None:
        if self._pool is not None:
            # staging waits for pinned buffers that only issuing (on this thread) gives back: issue until drained
            while any(c.issued is None for c in list(self._inflight.values())):
                self._issue_staged()
                time.sleep(0.0005)
            self._pool.shutdown(wait=True)
