"""SlotTable: adapter id -> GPU slot with refcounts; LRU eviction of idle slots only (no torch)."""
from __future__ import annotations

import threading
from collections import OrderedDict


class SlotTable:
    """Bookkeeping for `num_slots` device slots. A slot is held while its refcount (running requests) > 0.

    Free slots are used first, then the least recently released idle slot. `needs_load` from acquire()
    stays True until mark_loaded(); evict() of a held adapter is deferred to its last release, and the id
    cannot be acquired again until then (so a replaced adapter never reuses stale slot contents).
    """

    def __init__(self, num_slots: int):
        if num_slots < 0:
            raise ValueError("num_slots must be >= 0")
        self.num_slots = num_slots
        self._lock = threading.Lock()
        self._slot: dict[str, int] = {}  # id -> slot
        self._owner: list[str | None] = [None] * num_slots
        self._ref = [0] * num_slots
        self._loaded = [False] * num_slots
        self._doomed = [False] * num_slots  # evict at last release
        self._free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest index first
        self._idle: OrderedDict[int, None] = OrderedDict()  # resident, refcount 0; least recent first

    def lookup(self, adapter_id: str) -> int | None:
        with self._lock:
            return self._slot.get(adapter_id)

    def is_loaded(self, adapter_id: str) -> bool:
        with self._lock:
            s = self._slot.get(adapter_id)
            return s is not None and self._loaded[s]

    def refcount(self, adapter_id: str) -> int:
        with self._lock:
            s = self._slot.get(adapter_id)
            return 0 if s is None else self._ref[s]

    def can_acquire(self, adapter_id: str) -> bool:
        with self._lock:
            s = self._slot.get(adapter_id)
            if s is not None:
                return not self._doomed[s]
            return bool(self._free or self._idle)

    def acquire(self, adapter_id: str) -> tuple[int, bool] | None:
        """refcount++ -> (slot, needs_load); None when every slot is held (or the id awaits eviction)."""
        with self._lock:
            s = self._slot.get(adapter_id)
            if s is None:
                if self._free:
                    s = self._free.pop()
                elif self._idle:
                    s, _ = self._idle.popitem(last=False)
                    del self._slot[self._owner[s]]
                else:
                    return None
                self._slot[adapter_id], self._owner[s], self._loaded[s] = s, adapter_id, False
            elif self._doomed[s]:
                return None
            self._idle.pop(s, None)
            self._ref[s] += 1
            return s, not self._loaded[s]

    def release(self, adapter_id: str) -> None:
        """refcount--; at zero the slot becomes idle (or is freed if eviction was requested)."""
        with self._lock:
            s = self._slot.get(adapter_id)
            if s is None or self._ref[s] == 0:
                raise ValueError(f"release of adapter {adapter_id!r} that holds no slot reference")
            self._ref[s] -= 1
            if self._ref[s] == 0:
                if self._doomed[s]:
                    self._drop(s)
                else:
                    self._idle[s] = None

    def mark_loaded(self, adapter_id: str) -> None:
        with self._lock:
            s = self._slot.get(adapter_id)
            if s is None:
                raise ValueError(f"adapter {adapter_id!r} has no slot")
            self._loaded[s] = True

    def evict(self, adapter_id: str) -> bool:
        """Forget an adapter (deleted/replaced): True if gone now, False if deferred to its last release."""
        with self._lock:
            s = self._slot.get(adapter_id)
            if s is None:
                return True
            if self._ref[s] > 0:
                self._doomed[s] = True
                return False
            self._idle.pop(s, None)
            self._drop(s)
            return True

    def _drop(self, s: int) -> None:
        del self._slot[self._owner[s]]
        self._owner[s], self._loaded[s], self._doomed[s] = None, False, False
        self._free.append(s)

    def idle(self) -> bool:
        """True when no running request holds any slot."""
        with self._lock:
            return not any(self._ref)

    def resident(self) -> dict[str, int]:
        with self._lock:
            return dict(self._slot)

    def held(self) -> dict[str, int]:
        """id -> refcount for slots held by running requests."""
        with self._lock:
            return {a: self._ref[s] for a, s in self._slot.items() if self._ref[s] > 0}
