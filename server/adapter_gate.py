"""The AdapterService's engine-thread side: slot grants, asynchronous copies into slots, prefetch, gate metrics."""
from __future__ import annotations

import logging
import time

from loramux.adapters.errors import INTERNAL, AdapterError
from loramux.adapters.loading import Histogram

log = logging.getLogger("loramux.adapters")
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SlotGate:
    """The scheduler's AdapterGate over self.table (SlotTable), self.loader / self.cache (disk -> CPU) and
    self.device_slots (LoRASlots): try_acquire / release, and the optional is_resident, weights_ready,
    prefetch, admitted. A slot being copied into is held by one reference of the gate's own and is granted
    only once its copy has completed (device_slots.ready: an event query on CUDA, never a wait)."""

    # Copies run FIFO on one copy stream: a longer queue only delays the next request that needs a slot (seconds
    # on the H100 when prefetch queued a copy for every waiting adapter) and takes slots long before their use.
    max_prefetch_copies = 4

    def _init_gate(self) -> None:
        self.counters = dict.fromkeys(("gpu_hits", "gpu_loads", "gpu_evictions", "waits", "prefetch_gpu",
                                       "prefetch_disk", "prefetch_hits_gpu", "prefetch_hits_cpu",
                                       "prefetch_wasted"), 0)
        self.load_seconds = {"gpu": 0.0}  # start of a copy into a device slot -> slot seen usable
        self.gpu_latency = Histogram()  # the same, per copy
        self.wait_latency = Histogram(WAIT_BUCKETS)  # per admitted adapter request: time passed over for it
        self._pending: set[str] = set()  # keys the gate asked for while they were still on disk / loading
        self._copying: dict[str, tuple[int, float]] = {}  # key -> (slot, start) of a copy in flight
        self._prefetched_cpu: set[str] = set()  # disk loads started ahead by prefetch, not yet used
        self._prefetched_gpu: set[str] = set()  # slot copies started ahead by prefetch, not yet used
        self._window: set[str] | None = None  # keys the last prefetch() allows to load from disk
        self._wanted: set[str] = set()  # adapters of waiting requests: their idle slots are kept...
        self._urgent: set[str] = set()  # ...except from these (past the fairness bound)
        self._slot_owner: dict[int, str] = {}  # last adapter written into each device slot
        self.arrival_loads = 0  # disk loads started by hint() (on other threads: not in `counters`)

    def try_acquire(self, adapter_id: str) -> bool:
        if self.table.is_loaded(adapter_id):
            if self.table.acquire(adapter_id) is None:
                return False
            self.counters["gpu_hits"] += 1
            if adapter_id in self._prefetched_gpu:
                self._prefetched_gpu.discard(adapter_id)
                self.counters["prefetch_hits_gpu"] += 1
            return True
        if adapter_id not in self._copying:
            loaded = self._cpu(adapter_id)
            if loaded is None or not self._may_take_slot(adapter_id) or not self._start_copy(adapter_id, loaded):
                self.counters["waits"] += 1
                return False
        self._prefetched_gpu.discard(adapter_id)  # waited for its copy: not a prefetch hit
        if self._finish_copy(adapter_id, grant=True):
            return True
        self.counters["waits"] += 1
        return False

    def release(self, adapter_id: str) -> None:
        self.table.release(adapter_id)

    def is_resident(self, adapter_id: str) -> bool:
        return self.table.is_loaded(adapter_id)

    def weights_ready(self, adapter_id: str) -> bool:
        """In a slot, being copied into one, or in CPU memory (no disk read left)."""
        return adapter_id in self._copying or self.table.is_loaded(adapter_id) or adapter_id in self.cache

    def admitted(self, adapter_id: str, waited_s: float) -> None:
        self.wait_latency.observe(waited_s)

    def _cpu(self, adapter_id: str):
        """The CPU copy, or None while on disk / loading (a disk load starts only inside the prefetch window)."""
        start = self._window is None or adapter_id in self._window
        loaded = self.loader.poll(adapter_id, start=start)  # background disk -> CPU load
        if isinstance(loaded, AdapterError):
            self._pending.discard(adapter_id)
            raise loaded
        if loaded is None:
            self._pending.add(adapter_id)
        else:
            self._used_cpu(adapter_id)
        return loaded

    def _used_cpu(self, adapter_id: str) -> None:
        if adapter_id in self._prefetched_cpu:
            self._prefetched_cpu.discard(adapter_id)
            if adapter_id not in self._pending:  # never waited for the disk
                self.counters["prefetch_hits_cpu"] += 1
        self._pending.discard(adapter_id)

    def _start_copy(self, adapter_id: str, loaded) -> bool:
        """Take a slot (the service holds one reference while the copy runs) and start copying into it."""
        got = self.table.acquire(adapter_id)
        if got is None:
            return False
        slot, needs_load = got
        if not needs_load:  # loaded meanwhile: granted through is_loaded next time
            self.table.release(adapter_id)
            return False
        gone = self._slot_owner.get(slot)
        if gone not in (None, adapter_id):
            self.counters["gpu_evictions"] += 1
            if gone in self._prefetched_gpu:
                self._prefetched_gpu.discard(gone)
                self.counters["prefetch_wasted"] += 1
        self._slot_owner[slot] = adapter_id
        self._copying[adapter_id] = (slot, time.perf_counter())
        try:
            self.device_slots.start_load(slot, loaded)
        except Exception as exc:
            self._copy_failed(adapter_id, slot, exc)
        return True

    def _finish_copy(self, adapter_id: str, grant: bool) -> bool:
        """If the copy has completed: mark the slot usable and drop the service's reference (after taking the
        request's when grant). True if granted."""
        slot, t0 = self._copying[adapter_id]
        try:
            if not self.device_slots.ready(slot):  # an event query, never a wait
                return False
        except Exception as exc:
            self._copy_failed(adapter_id, slot, exc)
        del self._copying[adapter_id]
        seconds = time.perf_counter() - t0
        self.gpu_latency.observe(seconds)
        self.load_seconds["gpu"] += seconds
        self.counters["gpu_loads"] += 1
        self.table.mark_loaded(adapter_id)
        granted = grant and self.table.acquire(adapter_id) is not None  # None if deleted meanwhile
        self.table.release(adapter_id)
        return granted

    def _copy_failed(self, adapter_id: str, slot: int, exc: Exception):
        self._copying.pop(adapter_id, None)
        self._slot_owner.pop(slot, None)
        self.table.evict(adapter_id)  # deferred to the release below
        self.table.release(adapter_id)
        raise AdapterError(f"copying adapter {adapter_id!r} to the device failed: {exc}", None, INTERNAL) from exc

    def _may_take_slot(self, adapter_id: str, prefetch: bool = False) -> bool:
        """A new slot comes from the free ones, else from idle ones no waiting request wants (urgent ones may take
        any idle slot, except to prefetch)."""
        if not self.table.can_acquire(adapter_id):
            return False
        resident = self.table.resident()
        if adapter_id in resident or len(resident) < self.table.num_slots or \
                (adapter_id in self._urgent and not prefetch):
            return True
        held = self.table.held()
        return any(a not in held and a not in self._wanted for a in resident)

    def prefetch(self, wanted: list[str], urgent: set[str] = frozenset()) -> None:
        """Adapters of waiting requests, most urgent first: load the first ones from disk (as many as the CPU cache
        holds) and copy those already in CPU memory into free slots, or into idle slots no waiting request wants.
        Idle slots of wanted adapters become the most recently used (so LRU eviction takes others first). At most
        max_prefetch_copies slot copies are in flight from prefetch (a request's own copy is not held back)."""
        for aid in list(self._copying):
            try:
                self._finish_copy(aid, grant=False)
            except AdapterError as exc:
                log.warning("%s", exc)
        self._wanted, self._urgent = set(wanted), set(urgent)
        resident, held = self.table.resident(), self.table.held()
        for aid in reversed(wanted):
            if aid in resident and aid not in held and self.table.acquire(aid) is not None:
                self.table.release(aid)  # re-queued as the most recently idle
        # Adapters still on disk count as the cached mean: counting them as 0 bytes let the window outgrow the
        # byte budget, and its loads then evicted each other (thousands of reloads per minute under a deep queue).
        window, nbytes, guess = [], 0, self.cache.mean_nbytes()
        for aid in wanted:
            if aid in resident:
                continue
            item = self.cache.peek(aid)
            size = item.nbytes if item is not None else guess
            if len(window) >= self.cache.max_adapters or (self.cache.max_bytes is not None and window
                                                          and nbytes + size > self.cache.max_bytes):
                break
            nbytes += size
            window.append(aid)
        self._window = set(window)
        self.cache.touch(reversed(window))  # the most urgent becomes the most recent: evicted last
        gpu = True  # no copies ahead while an adapter past the bound still lacks a slot: the slot is its
        for aid in window:
            if aid not in self.cache and not self.loader.in_flight(aid):
                self.loader.request(aid)
                if self.loader.in_flight(aid):
                    self._prefetched_cpu.add(aid)
                    self.counters["prefetch_disk"] += 1
            loaded = self.cache.peek(aid)
            if gpu and loaded is not None and len(self._copying) < self.max_prefetch_copies and \
                    self._may_take_slot(aid, prefetch=True):
                self.cache.get(aid)  # counted as a CPU-tier hit
                self._used_cpu(aid)
                try:
                    if self._start_copy(aid, loaded):
                        self._prefetched_gpu.add(aid)
                        self.counters["prefetch_gpu"] += 1
                        self._finish_copy(aid, grant=False)  # on CPU the copy is already done
                        continue
                except AdapterError as exc:
                    log.warning("%s", exc)
            gpu = gpu and aid not in self._urgent

    def hint(self, adapter_id: str) -> bool:
        """A request for adapter_id has just arrived (any thread; the server calls this before queueing it for the
        engine thread): start its disk -> CPU load now, while the step in flight runs, instead of at the next
        schedule (one step less for a request whose adapter is on disk). Only while the adapters waiting requests
        want fill at most half the CPU cache, so a hint never evicts what prefetch's window keeps. True if a load
        was started."""
        if adapter_id in self.cache or self.table.is_loaded(adapter_id) or self.loader.in_flight(adapter_id):
            return False
        room, budget = len(self._wanted) + 1, self.cache.max_bytes
        if room > self.cache.max_adapters // 2 or (budget is not None and
                                                   room * self.cache.mean_nbytes() > budget // 2):
            return False
        self.loader.request(adapter_id)
        if not self.loader.in_flight(adapter_id):  # recently failed, or cached meanwhile
            return False
        self.arrival_loads += 1
        return True

    def gate_stats(self) -> dict:
        c = self.counters
        return {"slots_loading": len(self._copying),
                "loads_total": {"gpu": c["gpu_loads"], "disk": self.loader.loads},
                "waits_total": c["waits"],
                "prefetches_total": {"gpu": c["prefetch_gpu"], "disk": c["prefetch_disk"]},
                "prefetch_hits_total": {"gpu": c["prefetch_hits_gpu"], "cpu": c["prefetch_hits_cpu"]},
                "prefetch_wasted_total": c["prefetch_wasted"], "arrival_loads_total": self.arrival_loads,
                "load_seconds_total": {"gpu": self.load_seconds["gpu"],
                                       "disk": self.loader.latency.snapshot()["sum"]},
                "load_latency_seconds": {"gpu": self.gpu_latency.snapshot(),
                                         "disk": self.loader.latency.snapshot()},
                "wait_seconds": self.wait_latency.snapshot()}
