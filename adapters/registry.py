"""AdapterRegistry: validated PEFT adapters on disk, one folder per id, published by atomic rename."""
# Layout (flat; ids are global, the tenant is an attribute kept in loramux.json):
#   root/<id>/adapter_config.json, adapter_model.safetensors, [tokenizer_config.json], loramux.json
#   root/.tmp-*  an add in progress (invisible: ids start with a letter or digit); removed at start
#   root/.old-<id>-*  the previous version during a replace; restored at start if <id> is missing
#   root/.del-*  a folder being deleted; removed at start
# A PEFT folder dropped into root by hand is served too; its info is computed from its files.
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import MAX_CONFIG_BYTES, parse_lora_config
from .errors import EXISTS, NOT_FOUND, TOO_LARGE, AdapterError
from .loader import CONFIG_FILE, MAX_WEIGHTS_BYTES, build, check_files
from .safetensors_io import WEIGHTS_FILE, parse_header, read_bytes
from .spec import MODULES, BaseModelSpec
from .validate import pair_keys

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
META_FILE = "loramux.json"
TOKENIZER_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    path: Path
    tenant: str | None
    created: float  # unix seconds
    size: int  # bytes on disk
    rank: int  # largest rank among its modules
    targets: tuple[str, ...]  # targeted projections, e.g. ("q_proj", "v_proj")
    base_model_name_or_path: str | None = None


def check_id(adapter_id: object, field: str = "adapter_id") -> str:
    if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id):  # fullmatch: no trailing "\n"
        raise AdapterError(f"invalid {field} {str(adapter_id)[:64]!r}: use 1-128 letters, digits, '.', '_' or "
                           "'-', starting with a letter or digit", field)
    return adapter_id


def _summary(config_bytes: bytes, weights: bytes) -> dict:
    config = parse_lora_config(config_bytes)
    header = parse_header(weights)
    pairs = pair_keys(header)
    mods = {m for _, m in pairs}
    return {"rank": max((header[a][1][0] for a, _ in pairs.values()), default=0),
            "targets": [m for m in MODULES if m in mods],
            "base_model_name_or_path": config.base_model_name_or_path}


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
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
        self._lock = threading.RLock()
        self._busy: set[str] = set()  # ids with an add in progress
        self._info: dict[str, AdapterInfo] = {}  # computed info of hand-placed folders
        for p in self.root.iterdir():  # leftovers of a crash mid-add, mid-replace or mid-delete
            if not p.is_dir() or p.is_symlink():
                continue
            if p.name.startswith(".old-"):  # replaced version: restore it if the new one never landed
                aid = p.name[5:].rsplit("-", 1)[0]
                if ID_RE.fullmatch(aid) and not (self.root / aid).exists() and (p / "x").is_dir():
                    os.rename(p / "x", self.root / aid)
            if p.name.startswith((".tmp-", ".del-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)

    # -- lookups ---------------------------------------------------------------------------------------
    def path_of(self, adapter_id: str) -> Path | None:
        if not isinstance(adapter_id, str) or not ID_RE.fullmatch(adapter_id):
            return None
        p = self.root / adapter_id
        # containment: never follow a symlink out of root
        if p.is_symlink() or not p.is_dir() or os.path.commonpath([p.resolve(), self.root]) != str(self.root):
            return None
        return p

    def get(self, adapter_id: str) -> AdapterInfo | None:
        p = self.path_of(adapter_id)
        if p is None:
            return None
        try:
            meta = json.loads((p / META_FILE).read_text())
            return AdapterInfo(adapter_id, p, meta.get("tenant"), float(meta["created"]), int(meta["size"]),
                               int(meta["rank"]), tuple(meta["targets"]), meta.get("base_model_name_or_path"))
        except (OSError, ValueError, KeyError, TypeError):
            return self._computed_info(adapter_id, p)

    def _computed_info(self, adapter_id: str, p: Path) -> AdapterInfo | None:
        with self._lock:
            if adapter_id in self._info and self._info[adapter_id].path == p:
                return self._info[adapter_id]
        try:
            cfg, w = check_files(p)
            s = _summary(read_bytes(cfg, MAX_CONFIG_BYTES, CONFIG_FILE),
                         read_bytes(w, self.max_weights_bytes, WEIGHTS_FILE))
            size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        except (AdapterError, OSError):
            return None  # not a servable folder; load_adapter reports why when it is requested
        info = AdapterInfo(adapter_id, p, None, p.stat().st_mtime, size, s["rank"], tuple(s["targets"]),
                           s["base_model_name_or_path"])
        with self._lock:
            self._info[adapter_id] = info
        return info

    def list(self, tenant: str | None = None) -> list[AdapterInfo]:
        infos = (self.get(p.name) for p in sorted(self.root.iterdir()) if ID_RE.fullmatch(p.name))
        return [i for i in infos if i is not None and (tenant is None or i.tenant == tenant)]

    def __contains__(self, adapter_id: str) -> bool:
        return self.path_of(adapter_id) is not None

    # -- writes ----------------------------------------------------------------------------------------
    def add_files(self, adapter_id: str, config_bytes: bytes, weights_bytes: bytes, tenant: str | None = None,
                  spec: BaseModelSpec | None = None, overwrite: bool = False,
                  tokenizer_config: bytes | None = None) -> AdapterInfo:
        """Validate, write to a temp folder (fsynced), then publish by rename; 409 if it exists."""
        check_id(adapter_id)
        if tenant is not None:
            check_id(tenant, "tenant")
        if len(weights_bytes) > self.max_weights_bytes:
            raise AdapterError(f"{WEIGHTS_FILE} is {len(weights_bytes)} bytes; the limit is "
                               f"{self.max_weights_bytes}", WEIGHTS_FILE, TOO_LARGE)
        if not overwrite and adapter_id in self:
            raise AdapterError(f"adapter {adapter_id!r} already exists", "adapter_id", EXISTS)
        summary = _summary(config_bytes, weights_bytes)  # config + header checks, no spec needed
        if tokenizer_config is not None:
            try:
                ok = len(tokenizer_config) <= MAX_CONFIG_BYTES and isinstance(json.loads(tokenizer_config), dict)
            except (ValueError, UnicodeDecodeError, RecursionError):
                ok = False
            if not ok:
                raise AdapterError(f"{TOKENIZER_FILE} must be a JSON object of at most {MAX_CONFIG_BYTES} bytes",
                                   TOKENIZER_FILE)
        if spec is not None:  # full validation in the serving dtype before anything touches the disk
            build(parse_lora_config(config_bytes), weights_bytes, spec, getattr(torch, spec.dtype), adapter_id)
        with self._lock:
            if adapter_id in self._busy:
                raise AdapterError(f"adapter {adapter_id!r} is being written by another request", "adapter_id",
                                   EXISTS)
            self._busy.add(adapter_id)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            files = {CONFIG_FILE: config_bytes, WEIGHTS_FILE: weights_bytes}
            if tokenizer_config is not None:
                files[TOKENIZER_FILE] = tokenizer_config
            meta = {"tenant": tenant, "created": time.time(), "size": sum(len(b) for b in files.values()),
                    **summary}
            files[META_FILE] = json.dumps(meta).encode()
            for name, data in files.items():
                _write(tmp / name, data)
            _fsync_dir(tmp)
            dest = self.root / adapter_id
            with self._lock:
                old = None
                if dest.exists() or dest.is_symlink():
                    if not overwrite:
                        raise AdapterError(f"adapter {adapter_id!r} already exists", "adapter_id", EXISTS)
                    # the id in the name lets a restart put the old version back if we die mid-swap
                    old = Path(tempfile.mkdtemp(prefix=f".old-{adapter_id}-", dir=self.root))
                    os.rename(dest, old / "x")
                try:
                    os.rename(tmp, dest)
                except BaseException:
                    if old is not None:
                        os.rename(old / "x", dest)
                        shutil.rmtree(old, ignore_errors=True)
                    raise
                _fsync_dir(self.root)
                self._info.pop(adapter_id, None)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return self.get(adapter_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
            with self._lock:
                self._busy.discard(adapter_id)

    def add_dir(self, adapter_id: str, src_dir: Path, tenant: str | None = None,
                spec: BaseModelSpec | None = None, overwrite: bool = False) -> AdapterInfo:
        """Copy a PEFT folder (safetensors + config, optional tokenizer_config.json; never pickles)."""
        cfg, w = check_files(Path(src_dir))
        tok = Path(src_dir) / TOKENIZER_FILE
        return self.add_files(adapter_id, read_bytes(cfg, MAX_CONFIG_BYTES, CONFIG_FILE),
                              read_bytes(w, self.max_weights_bytes, WEIGHTS_FILE), tenant, spec, overwrite,
                              read_bytes(tok, MAX_CONFIG_BYTES, TOKENIZER_FILE) if tok.is_file() else None)

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter (rename away first, so it vanishes atomically); 404 if absent."""
        with self._lock:
            p = self.path_of(adapter_id)
            if p is None:
                raise AdapterError(f"adapter {str(adapter_id)[:128]!r} does not exist", "adapter_id", NOT_FOUND)
            gone = Path(tempfile.mkdtemp(prefix=".del-", dir=self.root))
            os.rename(p, gone / "x")
            _fsync_dir(self.root)
            self._info.pop(adapter_id, None)
        shutil.rmtree(gone, ignore_errors=True)

    def info_dict(self, adapter_id: str) -> dict | None:
        """JSON-ready info without the server path (for API responses)."""
        info = self.get(adapter_id)
        if info is None:
            return None
        d = asdict(info)
        d.pop("path")
        d["targets"] = list(info.targets)
        return d
