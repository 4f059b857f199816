"""Disk -> CPU adapter loads in worker processes.

Reading, validating and packing an adapter is ~2,000 small Python and torch calls (Llama-3-8B, 7 projections:
~450 tensors). On a thread of the server process each call that hands back the GIL may wait up to the switch
interval for the engine thread, which runs Python for most of an eager step: on the H100 host a 157 MB load took
0.3-0.7 s that way against ~0.1 s alone. A worker process has its own interpreter: it does all of that work and
writes the slot-ready packed bytes to a file (in /dev/shm when it has room), and the server process reads them
back with one readinto() (a memcpy without the GIL) and builds a dozen views."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from .errors import INTERNAL, AdapterError
from .loader import MAX_WEIGHTS_BYTES, LoadedAdapter, load_adapter
from .packed import PackedViews, from_buffer

_SHM = Path("/dev/shm")
_SHM_FREE_BYTES = 4 << 30  # use /dev/shm only with this much room (Docker's default is 64 MB)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _ready() -> int:
    return os.getpid()


def convert(path: str, spec, dtype: torch.dtype, max_weights_bytes: int, out_file: str) -> dict:
    """In the worker: load and validate the folder, write the packed bytes to out_file -> what the parent needs
    to rebuild the LoadedAdapter around them. Refusals raise AdapterError (it pickles with field and status)."""
    phases = Counter()
    ad = load_adapter(Path(path), spec, dtype, max_weights_bytes=max_weights_bytes, phases=phases)
    t0 = time.perf_counter()
    with open(out_file, "wb") as f:
        f.write(memoryview(ad.packed.buffer.numpy()))
    phases["write"] += time.perf_counter() - t0
    return {"config": ad.config, "layout": ad.packed.layout, "num_layers": ad.packed.num_layers,
            "size": ad.packed.buffer.numel(), "ranks": dict(ad.weights.ranks), "scales": ad.scales,
            "max_rank": ad.max_rank, "nbytes": ad.nbytes, "phases": dict(phases)}


def _scratch_dir() -> Path:
    try:
        if _SHM.is_dir() and shutil.disk_usage(_SHM).free >= _SHM_FREE_BYTES:
            return Path(tempfile.mkdtemp(prefix="loramux-loads-", dir=_SHM))
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="loramux-loads-"))


class ProcessLoads:
    """A pool of `workers` spawned processes (spawn: the server process has CUDA state a fork must not copy),
    started at once in the background so the first load does not pay for their start (~2-5 s: importing torch)."""

    def __init__(self, workers: int, threads_per_worker: int = 4):
        self.workers, self.threads = workers, threads_per_worker
        self.dir = _scratch_dir()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.threads,))
        for _ in range(self.workers):
            pool.submit(_ready)
        return pool

    def load(self, path: Path, spec, dtype: torch.dtype, adapter_id: str | None, pin: bool,
             phases: Counter, max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> LoadedAdapter:
        out = self.dir / f"{uuid.uuid4().hex}.bin"
        try:
            try:
                meta = self._pool.submit(convert, str(path), spec, dtype, max_weights_bytes, str(out)).result()
            except BrokenProcessPool as exc:  # a worker died (killed, out of memory): start a fresh pool
                self._pool = self._start()
                raise AdapterError(f"adapter {adapter_id!r} could not be loaded (a load worker process died)",
                                   None, INTERNAL) from exc
            phases.update(meta["phases"])
            t0 = time.perf_counter()
            buf = _empty(meta["size"], pin)
            t1 = time.perf_counter()
            with open(out, "rb") as f:
                got = f.readinto(memoryview(buf.numpy()))
            if got != meta["size"]:
                raise AdapterError(f"adapter {adapter_id!r}: its packed form was cut short", None, INTERNAL)
            phases["alloc"] += t1 - t0
            phases["transfer"] += time.perf_counter() - t1
        finally:
            out.unlink(missing_ok=True)
        packed = from_buffer(meta["num_layers"], buf, meta["layout"])
        return LoadedAdapter(adapter_id, meta["config"], PackedViews(packed, meta["ranks"]), meta["scales"],
                             meta["max_rank"], meta["nbytes"], meta["num_layers"], packed)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _empty(nbytes: int, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # page-locked memory exhausted: pageable still works, only uploads are slower
            pass
    return torch.empty(nbytes, dtype=torch.uint8)
