"""PinnedStaging: a few page-locked buffers that pageable adapters pass through on their way to a GPU slot.

A host -> GPU copy from pageable memory blocks its thread and runs at a fraction of the pinned rate, while
page-locking each adapter of the CPU cache costs more than loading it (cudaHostAlloc measured at ~0.9 GB/s on
the H100 host: 0.4 s for a 336 MB adapter). Staging costs one memcpy per upload into a buffer that is reused,
and only on the copy thread."""
from __future__ import annotations

import queue

import torch


class _Buffer:
    def __init__(self):
        self.data: torch.Tensor | None = None  # uint8, pinned; grown to the largest adapter seen
        self.free_after: torch.cuda.Event | None = None  # the last copy that reads it


class PinnedStaging:
    def __init__(self, count: int = 2, pin: bool = True):
        self.pin = pin  # False only in CPU tests of the copy threads
        self._free: queue.Queue[_Buffer] = queue.Queue()
        for _ in range(count):
            self._free.put(_Buffer())

    def acquire(self, nbytes: int) -> _Buffer:
        """A buffer of at least nbytes whose previous copies have completed (waits for them: call on the copy
        thread). Raises RuntimeError (after giving the buffer back) when page-locked memory is exhausted."""
        buf = self._free.get()
        try:
            if buf.free_after is not None:
                buf.free_after.synchronize()
                buf.free_after = None
            if buf.data is None or buf.data.numel() < nbytes:
                buf.data = None  # free the old one first
                buf.data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        except BaseException:
            self._free.put(buf)
            raise
        return buf

    def release(self, buf: _Buffer, free_after: torch.cuda.Event | None) -> None:
        """Give the buffer back; it is reused only once `free_after` (recorded after its copies) has completed."""
        buf.free_after = free_after
        self._free.put(buf)

    @property
    def nbytes(self) -> int:
        return sum(b.data.numel() for b in list(self._free.queue) if b.data is not None)
