"""AdapterRegistry: validated PEFT adapters on disk, one folder per id, immutable versions published by rename."""
# Layout, versions and crash recovery: see layout.py.
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import MAX_CONFIG_BYTES, parse_lora_config
from .errors import EXISTS, NOT_FOUND, TOO_LARGE, AdapterError
from .layout import ID_RE, TOKENIZER_FILE, check_tokenizer_config, current, is_flat, recover, summary, versions
from .loader import CONFIG_FILE, MAX_WEIGHTS_BYTES, build, check_files
from .safetensors_io import WEIGHTS_FILE, read_bytes
from .spec import BaseModelSpec

META_FILE = "loramux.json"
__all__ = ["ID_RE", "META_FILE", "TOKENIZER_FILE", "AdapterInfo", "AdapterRegistry", "check_id"]


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    path: Path  # folder of the current version
    tenant: str | None
    created: float  # unix seconds
    size: int  # bytes on disk
    rank: int  # largest rank among its modules
    targets: tuple[str, ...]  # targeted projections, e.g. ("q_proj", "v_proj")
    base_model_name_or_path: str | None = None
    version: int = 0  # 0: a hand-placed folder; published versions count from 1


def check_id(adapter_id: object, field: str = "adapter_id") -> str:
    if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id):  # fullmatch: no trailing "\n"
        raise AdapterError(f"invalid {field} {str(adapter_id)[:64]!r}: use 1-128 letters, digits, '.', '_' or "
                           "'-', starting with a letter or digit", field)
    return adapter_id


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a folder (its entries) or a file already written."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    def __init__(self, root: Path, max_weights_bytes: int = MAX_WEIGHTS_BYTES):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_weights_bytes = max_weights_bytes
        self.keep_old_versions = False  # True: a replace leaves older versions for prune() (in-flight requests)
        self._lock = threading.RLock()
        self._busy: set[str] = set()  # ids with an add in progress
        self._last_version: dict[str, int] = {}  # highest version published per id by this process
        self._info: dict[str, AdapterInfo] = {}  # computed info of hand-placed folders
        recover(self.root)  # leftovers of a crash mid-add, mid-replace or mid-delete

    # -- lookups ---------------------------------------------------------------------------------------
    def _dir(self, adapter_id: str) -> Path | None:
        if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id):
            return None
        p = self.root / adapter_id
        # containment: never follow a symlink out of root
        if p.is_symlink() or not p.is_dir() or os.path.commonpath([p.resolve(), self.root]) != str(self.root):
            return None
        return p

    def path_of(self, adapter_id: str, version: int | None = None) -> Path | None:
        """Folder of the current version (or of `version`, while it is still on disk)."""
        d = self._dir(adapter_id)
        if d is None:
            return None
        if version is None:
            cur = current(d)
            return cur[0] if cur else None
        if version == 0:
            return d if is_flat(d) else None
        return d / f"v{version}" / d.name if version in versions(d) else None

    def versions(self, adapter_id: str) -> list[int]:
        d = self._dir(adapter_id)
        return [] if d is None else ([0] if is_flat(d) else versions(d))

    def get(self, adapter_id: str) -> AdapterInfo | None:
        d = self._dir(adapter_id)
        cur = current(d) if d is not None else None
        if cur is None:
            return None
        p, version = cur
        try:
            meta = json.loads((p / META_FILE).read_text())
            return AdapterInfo(adapter_id, p, meta.get("tenant"), float(meta["created"]), int(meta["size"]),
                               int(meta["rank"]), tuple(meta["targets"]), meta.get("base_model_name_or_path"),
                               version)
        except (OSError, ValueError, KeyError, TypeError):
            return self._computed_info(adapter_id, p, version)

    def _computed_info(self, adapter_id: str, p: Path, version: int) -> AdapterInfo | None:
        with self._lock:
            if adapter_id in self._info and self._info[adapter_id].path == p:
                return self._info[adapter_id]
        try:
            cfg, w = check_files(p)
            s = summary(read_bytes(cfg, MAX_CONFIG_BYTES, CONFIG_FILE),
                         read_bytes(w, self.max_weights_bytes, WEIGHTS_FILE))
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        except (AdapterError, OSError):
            return None  # not a servable folder; load_adapter reports why when it is requested
        info = AdapterInfo(adapter_id, p, None, p.stat().st_mtime, size, s["rank"], tuple(s["targets"]),
                           s["base_model_name_or_path"], version)
        with self._lock:
            self._info[adapter_id] = info
        return info

    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        infos = (self.get(p.name) for p in sorted(self.root.iterdir()) if ID_RE.fullmatch(p.name))
        return [i for i in infos if i is not None and (tenant is None or i.tenant == tenant)]

    def __contains__(self, adapter_id: str) -> bool:
        return self.path_of(adapter_id) is not None

    # -- writes ----------------------------------------------------------------------------------------
    def staging_dir(self) -> Path:
        """An empty temporary folder on the registry's filesystem (for streamed uploads; see add_staged)."""
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))

    def _validate(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes, tenant: str | None,
                  spec: BaseModelSpec | None, overwrite: bool, tokenizer_config: bytes | None) -> dict:
        check_id(adapter_id)
        if tenant is not None:
            check_id(tenant, "tenant")
        if len(weights_bytes) > self.max_weights_bytes:
            raise AdapterError(f"{WEIGHTS_FILE} is {len(weights_bytes)} bytes; the limit is "
                               f"{self.max_weights_bytes}", WEIGHTS_FILE, TOO_LARGE)
        if not overwrite and adapter_id in self:
            raise AdapterError(f"adapter {adapter_id!r} already exists", "adapter_id", EXISTS)
        info = summary(config_bytes, weights_bytes)  # config + header checks, no spec needed
        check_tokenizer_config(tokenizer_config)
        if spec is not None:  # full validation in the serving dtype before anything is published
            build(parse_lora_config(config_bytes), weights_bytes, spec, getattr(torch, spec.dtype), adapter_id)
        return info

    def add_files(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes, tenant: str | None = None,
                  spec: BaseModelSpec | None = None, overwrite: bool = False,
                  tokenizer_config: bytes | None = None) -> AdapterInfo:
        """Validate, write to a temp folder (fsynced), then publish by rename; 409 if it exists."""
        summary = self._validate(adapter_id, config_bytes, weights_bytes, tenant, spec, overwrite, tokenizer_config)
        files = {CONFIG_FILE: config_bytes, WEIGHTS_FILE: weights_bytes}
        if tokenizer_config is not None:
            files[TOKENIZER_FILE] = tokenizer_config
        return self._publish(adapter_id, None, files, summary, tenant, overwrite)

    def add_staged(self, adapter_id: str, staged: Path, tenant: str | None = None,
                   spec: BaseModelSpec | None = None, overwrite: bool = False) -> AdapterInfo:
        """Validate the files written into `staged` (staging_dir() of a registry on the same filesystem) and
        publish that very folder."""
        staged = Path(staged)
        try:
            if not staged.name.startswith(".tmp-") or not staged.is_dir():  # on this filesystem: rename works
                raise ValueError(f"{staged} is not a staging folder made by staging_dir()")
            extra = sorted(p.name for p in staged.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE,
                                                                              TOKENIZER_FILE))
            if extra:
                raise AdapterError(f"unexpected file {extra[0]!r} in the upload", extra[0])
            cfg, w = check_files(staged)
            tok = staged / TOKENIZER_FILE
            tok_bytes = read_bytes(tok, MAX_CONFIG_BYTES, TOKENIZER_FILE) if tok.is_file() else None
            summary = self._validate(adapter_id, read_bytes(cfg, MAX_CONFIG_BYTES, CONFIG_FILE),
                                     read_bytes(w, self.max_weights_bytes, WEIGHTS_FILE), tenant, spec, overwrite,
                                     tok_bytes)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return self._publish(adapter_id, staged, None, summary, tenant, overwrite)

    def _publish(self, adapter_id: str, tmp: Path | None, files: dict | None, summary: dict, tenant: str | None,
                 overwrite: bool) -> AdapterInfo:
        with self._lock:
            if adapter_id in self._busy:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise AdapterError(f"adapter {adapter_id!r} is being written by another request", "adapter_id",
                                   EXISTS)
            self._busy.add(adapter_id)
        wrap = None
        try:
            if tmp is None:
                tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
                for name, data in files.items():
                    _write(tmp / name, data)
            else:
                for f in tmp.iterdir():
                    _fsync_dir(f)
            # never reuse a number within this process (delete + re-add): caches know weights by version
            version = max(self.versions(adapter_id) + [self._last_version.get(adapter_id, 0)]) + 1
            self._last_version[adapter_id] = version
            meta = {"tenant": tenant, "created": time.time(), "version": version,
                    "size": sum(f.stat().st_size for f in tmp.iterdir()), **summary}
            _write(tmp / META_FILE, json.dumps(meta).encode())
            _fsync_dir(tmp)
            dest = self.root / adapter_id
            wrap = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))  # wrap/v<N>/<id>: the new version
            (wrap / f"v{version}").mkdir()
            with self._lock:
                old = None
                if (dest.exists() or dest.is_symlink()) and not overwrite:
                    raise AdapterError(f"adapter {adapter_id!r} already exists", "adapter_id", EXISTS)
                os.rename(tmp, wrap / f"v{version}" / adapter_id)
                _fsync_dir(wrap / f"v{version}")
                if self._dir(adapter_id) is not None and not is_flat(dest):
                    os.rename(wrap / f"v{version}", dest / f"v{version}")  # the new version appears atomically
                    _fsync_dir(dest)
                else:
                    if dest.exists() or dest.is_symlink():
                        # the id in the name lets a restart put the old folder back if we die mid-swap
                        old = Path(tempfile.mkdtemp(prefix=f".old-{adapter_id}-", dir=self.root))
                        os.rename(dest, old / "x")
                    try:
                        os.rename(wrap, dest)
                    except BaseException:
                        if old is not None:
                            os.rename(old / "x", dest)
                            shutil.rmtree(old, ignore_errors=True)
                        raise
                _fsync_dir(self.root)
                self._info.pop(adapter_id, None)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if not self.keep_old_versions:
                self.prune(adapter_id, ())
            return self.get(adapter_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
            if wrap is not None:
                shutil.rmtree(wrap, ignore_errors=True)
            with self._lock:
                self._busy.discard(adapter_id)

    def prune(self, adapter_id: str, keep: "set[int] | tuple[int, ...]") -> list[int]:
        """Remove versions other than the current one and `keep`; returns the versions removed."""
        gone = []
        with self._lock:
            d = self._dir(adapter_id)
            vs = self.versions(adapter_id)
            if d is None or not vs or vs == [0]:
                return gone
            for v in vs[:-1]:
                if v in keep:
                    continue
                trash = Path(tempfile.mkdtemp(prefix=".del-", dir=self.root))
                os.rename(d / f"v{v}", trash / "x")  # gone from the id's folder at once
                gone.append(trash)
        for trash in gone:
            shutil.rmtree(trash, ignore_errors=True)
        return [v for v in vs[:-1] if v not in keep]

    def add_dir(self, adapter_id: str, src_dir: Path, tenant: str | None = None,
                spec: BaseModelSpec | None = None, overwrite: bool = False) -> AdapterInfo:
        """Copy a PEFT folder (safetensors + config, optional tokenizer_config.json; never pickles)."""
        cfg, w = check_files(Path(src_dir))
        tok = Path(src_dir) / TOKENIZER_FILE
        return self.add_files(adapter_id, read_bytes(cfg, MAX_CONFIG_BYTES, CONFIG_FILE),
                              read_bytes(w, self.max_weights_bytes, WEIGHTS_FILE), tenant, spec, overwrite,
                              read_bytes(tok, MAX_CONFIG_BYTES, TOKENIZER_FILE) if tok.is_file() else None)

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter with all its versions (renamed away first, so it vanishes atomically); 404 if absent."""
        with self._lock:
            p = self._dir(adapter_id)
            if p is None or current(p) is None:
                raise AdapterError(f"adapter {str(adapter_id)[:128]!r} does not exist", "adapter_id", NOT_FOUND)
            gone = Path(tempfile.mkdtemp(prefix=".del-", dir=self.root))
            os.rename(p, gone / "x")
            _fsync_dir(self.root)
            self._info.pop(adapter_id, None)
        shutil.rmtree(gone, ignore_errors=True)

    def info_dict(self, adapter_id: str) -> dict | None:
        """JSON-ready info without the server path (for API responses)."""
        info = self.get(adapter_id)
        return None if info is None else {**{k: v for k, v in asdict(info).items() if k != "path"},
                                          "targets": list(info.targets)}
