"""CpuAdapterCache: thread-safe LRU of loaded adapters, bounded by count and bytes; pins memory on CUDA hosts."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .loader import LoadedAdapter


class CpuAdapterCache:
    def __init__(self, max_adapters: int, max_bytes: int | None = None, pin: bool | None = None):
        if max_adapters < 1:
            raise ValueError("max_adapters must be >= 1")
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._items: OrderedDict[str, LoadedAdapter] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = 0

    def get(self, adapter_id: str) -> LoadedAdapter | None:
        with self._lock:
            item = self._items.get(adapter_id)
            if item is None:
                self._misses += 1
                return None
            self._items.move_to_end(adapter_id)
            self._hits += 1
            return item

    def peek(self, adapter_id: str) -> LoadedAdapter | None:
        """The cached adapter without counting a hit or miss or changing its recency."""
        with self._lock:
            return self._items.get(adapter_id)

    def touch(self, adapter_ids) -> None:
        """Mark cached ids as used, in order (the last one becomes the most recent); unknown ids are ignored."""
        with self._lock:
            for aid in adapter_ids:
                if aid in self._items:
                    self._items.move_to_end(aid)

    def put(self, adapter_id: str, adapter: LoadedAdapter) -> bool:
        """Insert as most recent and evict LRU entries over the limits; False if it alone exceeds max_bytes."""
        if self.max_bytes is not None and adapter.nbytes > self.max_bytes:
            return False
        if self.pin:
            try:  # pinning copies; do it before taking the lock
                adapter.pin_memory()
            except RuntimeError:
                pass  # pinned memory exhausted: an unpinned copy still works, just slower to upload
        with self._lock:
            old = self._items.pop(adapter_id, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[adapter_id] = adapter
            self._bytes += adapter.nbytes
            while len(self._items) > self.max_adapters or (
                    self.max_bytes is not None and self._bytes > self.max_bytes):
                _, gone = self._items.popitem(last=False)
                self._bytes -= gone.nbytes
                self._evictions += 1
            return True

    def pop(self, adapter_id: str) -> LoadedAdapter | None:
        with self._lock:
            item = self._items.pop(adapter_id, None)
            if item is not None:
                self._bytes -= item.nbytes
            return item

    def mean_nbytes(self) -> int:
        """Mean size of the cached adapters (0 when empty): the prefetch window's guess for one still on disk."""
        with self._lock:
            return self._bytes // len(self._items) if self._items else 0

    def __contains__(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def ids(self) -> list[str]:
        """Cached ids, least recently used first."""
        with self._lock:
            return list(self._items)

    def stats(self) -> dict:
        with self._lock:
            return {"adapters": len(self._items), "bytes": self._bytes, "max_adapters": self.max_adapters,
                    "max_bytes": self.max_bytes, "hits": self._hits, "misses": self._misses,
                    "evictions": self._evictions, "pinned": self.pin}
