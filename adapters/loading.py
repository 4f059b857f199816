"""AdapterLoader: disk -> CPU loads on worker threads so the engine thread never blocks on I/O."""
from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from .cache import CpuAdapterCache
from .errors import INTERNAL, NOT_FOUND, AdapterError
from .loader import LoadedAdapter, load_adapter
from .registry import AdapterRegistry
from .spec import BaseModelSpec

Result = LoadedAdapter | AdapterError


class AdapterLoader:
    """request() starts a background load (idempotent); poll() returns the adapter, its error, or None."""

    def __init__(self, registry: AdapterRegistry, spec: BaseModelSpec, dtype: torch.dtype,
                 cpu_cache: CpuAdapterCache, max_workers: int = 2, error_ttl_s: float = 5.0):
        self.registry, self.spec, self.dtype, self.cache = registry, spec, dtype, cpu_cache
        self.error_ttl_s = error_ttl_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adapter-load")
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._errors: dict[str, tuple[AdapterError, float]] = {}  # id -> (error, expiry on monotonic clock)
        self._gen: dict[str, int] = {}  # bumped by invalidate() so stale in-flight results are dropped

    def _load(self, adapter_id: str, gen: int) -> LoadedAdapter:
        path = self.registry.path_of(adapter_id)
        if path is None:
            raise AdapterError(f"adapter {adapter_id!r} does not exist", "model", NOT_FOUND)
        try:
            adapter = load_adapter(path, self.spec, self.dtype, adapter_id=adapter_id)
        except AdapterError:
            raise
        except Exception as exc:  # I/O or decoding trouble: report it, never kill the worker
            raise AdapterError(f"adapter {adapter_id!r} could not be loaded ({type(exc).__name__}: {exc})",
                               None, INTERNAL) from exc
        with self._lock:
            current = self._gen.get(adapter_id, 0) == gen
        if current:
            self.cache.put(adapter_id, adapter)  # pins here, on the worker thread
        return adapter

    def _cached_error(self, adapter_id: str) -> AdapterError | None:
        hit = self._errors.get(adapter_id)
        if hit is None:
            return None
        if hit[1] <= time.monotonic():
            del self._errors[adapter_id]
            return None
        return hit[0]

    def request(self, adapter_id: str) -> None:
        """Start loading unless cached, in flight, or recently failed."""
        if adapter_id in self.cache:
            return
        with self._lock:
            if adapter_id in self._futures or self._cached_error(adapter_id) is not None:
                return
            self._futures[adapter_id] = self._pool.submit(self._load, adapter_id, self._gen.get(adapter_id, 0))

    def poll(self, adapter_id: str) -> Result | None:
        """The adapter when loaded, its AdapterError when it failed, None while loading (starts it if idle)."""
        hit = self.cache.get(adapter_id)
        if hit is not None:
            return hit
        with self._lock:
            err = self._cached_error(adapter_id)
            if err is not None:
                return err
            fut = self._futures.get(adapter_id)
            if fut is not None and fut.done():
                del self._futures[adapter_id]
                exc = fut.exception() if not fut.cancelled() else AdapterError(
                    f"loading adapter {adapter_id!r} was cancelled", None, INTERNAL)
                if exc is None:
                    return fut.result()
                assert isinstance(exc, AdapterError)
                self._errors[adapter_id] = (exc, time.monotonic() + self.error_ttl_s)
                return exc
        if fut is None:
            self.request(adapter_id)
        return None

    def get_blocking(self, adapter_id: str, timeout: float | None = None) -> LoadedAdapter:
        """Load on the caller's behalf and wait; raises the AdapterError on failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            res = self.poll(adapter_id)
            if isinstance(res, AdapterError):
                raise res
            if res is not None:
                return res
            with self._lock:
                fut = self._futures.get(adapter_id)
            if fut is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    fut.exception(timeout=left)  # waits without raising the load's own error
                except (FutureTimeout, CancelledError):
                    pass
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"adapter {adapter_id!r} did not load within {timeout} s")

    def invalidate(self, adapter_id: str) -> None:
        """Forget cached weights/errors (after delete or replace); an in-flight load is not cached."""
        with self._lock:
            self._gen[adapter_id] = self._gen.get(adapter_id, 0) + 1
            self._errors.pop(adapter_id, None)
            self._futures.pop(adapter_id, None)
        self.cache.pop(adapter_id)

    def loading(self) -> list[str]:
        with self._lock:
            return [a for a, f in self._futures.items() if not f.done()]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
