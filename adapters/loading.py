"""AdapterLoader: disk -> CPU loads on worker threads so the engine thread never blocks on I/O."""
from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from .cache import CpuAdapterCache
from .errors import INTERNAL, NOT_FOUND, AdapterError
from .loader import LoadedAdapter, load_adapter
from .packed_store import PackedStore
from .registry import AdapterRegistry
from .spec import BaseModelSpec

Result = LoadedAdapter | AdapterError
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Thread-safe cumulative histogram (Prometheus style: le buckets, sum, count) for latencies in seconds."""

    def __init__(self, buckets: tuple[float, ...] = LOAD_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)
        self._sum, self._count, self._lock = 0.0, 0, threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._sum += seconds
            self._count += 1
            for i, edge in enumerate(self.buckets):
                if seconds <= edge:
                    self._counts[i] += 1
                    break

    def snapshot(self) -> dict:
        """{"buckets": [(le, cumulative count), ...], "sum": s, "count": n}; +Inf is `count`."""
        with self._lock:
            cum, out = 0, []
            for edge, c in zip(self.buckets, self._counts):
                cum += c
                out.append((edge, cum))
            return {"buckets": out, "sum": self._sum, "count": self._count}


class AdapterLoader:
    """request() starts a background load (idempotent); poll() returns the adapter, its error, or None."""

    def __init__(self, registry: AdapterRegistry, spec: BaseModelSpec, dtype: torch.dtype,
                 cpu_cache: CpuAdapterCache, max_workers: int = 2, error_ttl_s: float = 5.0, processes: int = 0,
                 packed_store: PackedStore | None = None):
        self.registry, self.spec, self.dtype, self.cache = registry, spec, dtype, cpu_cache
        self.packed_store = packed_store  # packed forms on disk: a load of a known version maps one file
        self.processes = None  # with processes > 0 the work of a load runs in worker processes (load_worker.py)
        if processes > 0:
            from .load_worker import ProcessLoads

            self.processes = ProcessLoads(processes)
            max_workers = max(max_workers, processes)  # one thread waits on each worker's load
        self.error_ttl_s = error_ttl_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="adapter-load")
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._errors: dict[str, tuple[AdapterError, float]] = {}  # id -> (error, expiry on monotonic clock)
        self._gen: dict[str, int] = {}  # bumped by invalidate() so stale in-flight results are dropped
        self.latency = Histogram()  # seconds per successful disk -> CPU load (read + validate + pin)
        self.loads = 0  # successful disk -> CPU loads
        self.phase_seconds = Counter()  # seconds summed over loads: read, decode, alloc (pinning), pack, check;
        # with worker processes also write (worker -> file) and transfer (file -> this process); with a packed
        # store map (a known version's packed file) and save (writing a new version's packed file)

    def _load(self, adapter_id: str, gen: int) -> LoadedAdapter:
        path = self.registry.path_of(adapter_id)
        if path is None:
            raise AdapterError(f"adapter {adapter_id!r} does not exist", "model", NOT_FOUND)
        t0, phases = time.perf_counter(), Counter()
        adapter, key = self.packed_store.load(path, adapter_id) if self.packed_store is not None else (None, None)
        mapped = adapter is not None
        try:
            if mapped:
                phases["map"] += time.perf_counter() - t0
            elif self.processes is not None:
                adapter = self.processes.load(path, self.spec, self.dtype, adapter_id, self.cache.pin, phases)
            else:
                adapter = load_adapter(path, self.spec, self.dtype, adapter_id=adapter_id, pin=self.cache.pin,
                                       phases=phases)
        except AdapterError:
            raise
        except Exception as exc:  # I/O or decoding trouble: report it, never kill the worker
            raise AdapterError(f"adapter {adapter_id!r} could not be loaded ({type(exc).__name__}: {exc})",
                               None, INTERNAL) from exc
        with self._lock:
            current = self._gen.get(adapter_id, 0) == gen
        if current:
            self.cache.put(adapter_id, adapter)  # pins here, on the worker thread
        self.latency.observe(time.perf_counter() - t0)
        if key is not None and not mapped:  # after put(): waiting requests go on meanwhile
            t1 = time.perf_counter()
            self.packed_store.save(path, key, adapter)
            phases["save"] += time.perf_counter() - t1
        with self._lock:
            self.loads += 1
            self.phase_seconds.update(phases)  # Counter.update adds
        return adapter

    def prepack(self, adapter_id: str) -> None:
        """Write the packed form of a new version ahead of its first request (after an upload), in the background,
        leaving the CPU cache alone; nothing without a packed store or when the file is there already."""
        if self.packed_store is not None:
            self._pool.submit(self._prepack, adapter_id)

    def _prepack(self, adapter_id: str) -> None:
        path = self.registry.path_of(adapter_id)
        key = None if path is None else self.packed_store.key(path)
        if key is None or key in self.packed_store:
            return
        try:
            adapter = load_adapter(path, self.spec, self.dtype, adapter_id=adapter_id)
        except Exception:  # the request-time load reports it
            return
        self.packed_store.save(path, key, adapter)

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
            fut = self._futures[adapter_id] = self._pool.submit(self._load, adapter_id, self._gen.get(adapter_id, 0))
        fut.add_done_callback(lambda f: self._reap(adapter_id, f))

    def _reap(self, adapter_id: str, fut: Future) -> None:
        """Forget a load whose result is in the cache, so the future does not keep the weights alive after the
        cache evicts them (failed or uncached results stay until poll() hands them out)."""
        if fut.cancelled() or fut.exception() is not None or adapter_id not in self.cache:
            return
        with self._lock:
            if self._futures.get(adapter_id) is fut:
                del self._futures[adapter_id]

    def poll(self, adapter_id: str, start: bool = True) -> Result | None:
        """The adapter when loaded, its AdapterError when it failed, None while loading (starts it if idle, unless
        start=False)."""
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
        if fut is None and start:
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

    def in_flight(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._futures

    def loading(self) -> list[str]:
        with self._lock:
            return [a for a, f in self._futures.items() if not f.done()]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.processes is not None:
            self.processes.close()
