"""PackedStore: the slot-ready packed form of each adapter version, written to disk once and memory-mapped after.

A disk -> CPU load of a PEFT folder reads the safetensors file, validates it, casts it to the model dtype and packs
it (adapters/packed.py): ~260 ms of CPU per 157 MB on the H100 host, most of it memory traffic that holds a loader
thread for the whole load. The packed bytes depend only on the folder's files, the base model's shapes, the rank
limit and the dtype, so after the first load they are written to `root/<key>.lmx` and later loads map that file
(MAP_SHARED | MAP_POPULATE, read-only): no copy, no cast, no check, and the OS page cache is the CPU tier's backing
store (under memory pressure it drops clean pages and the next upload reads them from disk again).

The key hashes the stat of the config and weights files (device, inode, size, mtime_ns) with the model fingerprint:
published registry versions are immutable folders, and a hand-edited folder changes its mtime. Files are written to
a temporary name and renamed into place, and never modified after, so a mapping stays valid even when the file is
evicted (unlinked) meanwhile. Disk use is bounded by max_bytes (least recently used files are removed first).
File format: b"LMXPACK1", u64 header length, JSON header, zero padding to a 4 KiB boundary, the packed buffer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
import time
import warnings
from pathlib import Path

import torch

from .config import LoraConfig
from .loader import CONFIG_FILE, LoadedAdapter, read_config
from .packed import PackedViews, from_buffer
from .safetensors_io import WEIGHTS_FILE
from .spec import BaseModelSpec

log = logging.getLogger("loramux.adapters")
MAGIC = b"LMXPACK1"
FORMAT = 1  # bump when the packed layout changes: old files then miss and are evicted in time
_PAGE = 4096
SUFFIX = ".lmx"


def fingerprint(folder: Path, spec: BaseModelSpec, dtype: torch.dtype) -> str | None:
    """Hex key of (the folder's two files as they are now, the model) or None when a file is missing."""
    try:
        stats = [os.stat(folder / name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except OSError:
        return None
    parts = [FORMAT, str(dtype), spec.num_layers, sorted(spec.modules.items()), spec.max_lora_rank,
             [(s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:40]


def _read_meta(path: Path) -> dict:
    """The JSON header of a packed file ({} when unreadable: such a file is only ever evicted)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return {}
            (n,) = struct.unpack("<Q", head[8:16])
            return json.loads(f.read(min(n, 16 << 20)))
    except (OSError, ValueError):
        return {}


class PackedStore:
    def __init__(self, root: Path, spec: BaseModelSpec, dtype: torch.dtype, max_bytes: int):
        """max_bytes < 0: half the free space of root's file system at start, plus what the files there hold."""
        self.root, self.spec, self.dtype = Path(root), spec, dtype
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, tuple[int, float]] = {}  # key -> (bytes, last use, wall clock)
        self._folders: dict[str, str] = {}  # key -> the adapter folder it was packed from
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                p.unlink(missing_ok=True)  # a write a crash interrupted
            elif p.suffix == SUFFIX and p.is_file():
                st = p.stat()
                self._files[p.stem] = (st.st_size, st.st_mtime)
                self._folders[p.stem] = _read_meta(p).get("folder", "")
        self.hits = self.misses = self.writes = self.evictions = self.errors = 0
        self.max_bytes = max_bytes if max_bytes >= 0 else shutil.disk_usage(self.root).free // 2 + self.nbytes
        self._evict()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for size, _ in self._files.values())

    def key(self, folder: Path) -> str | None:
        """The key the folder's files have now (None when a file is missing)."""
        return fingerprint(folder, self.spec, self.dtype)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._files

    def load(self, folder: Path, adapter_id: str | None) -> tuple[LoadedAdapter | None, str | None]:
        """(the adapter mapped from its packed file, key) on a hit; (None, key to save() under) on a miss."""
        key = self.key(folder)
        if key is None:
            return None, None
        with self._lock:
            known = key in self._files
        if known:
            try:
                adapter = self._map(self._path(key), folder, adapter_id)
            except FileNotFoundError:
                adapter = None  # evicted in between
            except Exception as exc:  # a damaged file: forget it and load from the folder
                log.warning("packed adapter %s unusable, reloading %s (%s: %s)", key, adapter_id,
                            type(exc).__name__, exc)
                adapter = None
                self._drop(key)
                with self._lock:
                    self.errors += 1
            if adapter is not None:
                with self._lock:
                    self.hits += 1
                    if key in self._files:
                        self._files[key] = (self._files[key][0], time.time())
                return adapter, key
        with self._lock:
            self.misses += 1
        return None, key

    def _map(self, path: Path, folder: Path, adapter_id: str | None) -> LoadedAdapter:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if mm[:8] != MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack("<Q", mm[8:16])
        meta = json.loads(mm[16:16 + n])
        start = -(-(16 + n) // _PAGE) * _PAGE
        if start + meta["size"] != size:
            raise ValueError(f"size {size} != {start} + {meta['size']}")
        with warnings.catch_warnings():  # read-only mapping: nothing ever writes into a packed buffer
            warnings.simplefilter("ignore", UserWarning)
            buf = torch.frombuffer(mm, dtype=torch.uint8, offset=start, count=meta["size"])
        layout = tuple((k, name, off, getattr(torch, dt), tuple(shape)) for k, name, off, dt, shape in meta["layout"])
        packed = from_buffer(meta["num_layers"], buf, layout)
        ranks = {(layer, m): r for layer, m, r in meta["ranks"]}
        config: LoraConfig = read_config(folder / CONFIG_FILE)  # small; its stat is part of the key
        scales = {lm: config.scale_for(*lm) for lm in ranks}
        views = PackedViews(packed, ranks)
        return LoadedAdapter(adapter_id, config, views, scales, max(ranks.values()), views.nbytes,
                             meta["num_layers"], packed)

    def save(self, folder: Path, key: str | None, adapter: LoadedAdapter) -> bool:
        """Write the adapter's packed form under key if the folder is unchanged since the key was taken (best
        effort: a full disk or a race only costs the next load the slow path)."""
        p = adapter.packed
        if key is None or p is None or not isinstance(adapter.weights, PackedViews) or self.max_bytes <= 0:
            return False
        if self.key(folder) != key:
            return False  # the files changed while they were read
        meta = {"size": p.buffer.numel(), "num_layers": p.num_layers,
                "layout": [(k, name, off, str(dt).replace("torch.", ""), list(shape)) for k, name, off, dt, shape
                           in p.layout],
                "ranks": [(layer, m, r) for (layer, m), r in adapter.weights.ranks.items()], "folder": str(folder)}
        head = json.dumps(meta).encode()
        pre = MAGIC + struct.pack("<Q", len(head)) + head
        pre += bytes(-len(pre) % _PAGE)
        total = len(pre) + meta["size"]
        if total > self.max_bytes:
            return False
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                f.write(pre)
                f.write(memoryview(p.buffer.numpy()))  # one write: releases the GIL for the copy
            os.replace(tmp, self._path(key))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("could not write the packed form of %s (%s)", adapter.adapter_id, exc)
            with self._lock:
                self.errors += 1
            return False
        with self._lock:
            self._files[key] = (total, time.time())
            self._folders[key] = str(folder)
            self.writes += 1
        self._evict(keep=key)
        return True

    def drop_missing(self) -> int:
        """Remove the files of adapter folders that are gone (deleted or replaced versions) -> how many."""
        with self._lock:
            keys = [k for k, folder in self._folders.items() if not folder or not Path(folder).is_dir()]
        for k in keys:
            self._drop(k)
        return len(keys)

    def _drop(self, key: str) -> None:
        with self._lock:
            self._files.pop(key, None)
            self._folders.pop(key, None)
        self._path(key).unlink(missing_ok=True)  # a live mapping keeps its pages until it is closed

    def _evict(self, keep: str | None = None) -> None:
        while True:
            with self._lock:
                total = sum(size for size, _ in self._files.values())
                old = [k for k in sorted(self._files, key=lambda k: self._files[k][1]) if k != keep]
                if total <= self.max_bytes or not old:
                    return
                self.evictions += 1
            self._drop(old[0])

    def stats(self) -> dict:
        with self._lock:
            return {"files": len(self._files), "bytes": sum(s for s, _ in self._files.values()),
                    "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses, "writes": self.writes,
                    "evictions": self.evictions, "errors": self.errors}
