"""On-disk layout of an adapter registry: version folders, crash recovery at start, content summaries."""
# Layout of one registry (one namespace; the server keeps one per tenant):
#   root/<id>/v<N>/<id>/adapter_config.json, adapter_model.safetensors, [tokenizer_config.json], loramux.json
#       versions are immutable once published (a load never sees a half-swapped folder); the highest N is
#       current; a replace adds v<N+1>; the leaf keeps the id as its name
#   root/<id>/adapter_config.json ...  a folder placed by hand (or restored by a restart): version 0
#   root/.tmp-*  an add or an upload in progress (ids start with a letter or digit: never listed); removed at start
#   root/.old-<id>-*  a hand-placed folder being replaced; restored at start if <id> has no version left
#   root/.del-*  a folder being deleted; removed at start
# At start only the current version of each id is kept (older ones are only held for in-flight requests).
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .config import MAX_CONFIG_BYTES, parse_lora_config
from .errors import AdapterError
from .loader import CONFIG_FILE
from .safetensors_io import WEIGHTS_FILE, parse_header
from .spec import MODULES
from .validate import pair_keys

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,9})$")
TOKENIZER_FILE = "tokenizer_config.json"


def is_flat(d: Path) -> bool:
    """A hand-placed (or restored) folder: the adapter files sit directly in <id>/."""
    return (d / CONFIG_FILE).is_file() or (d / WEIGHTS_FILE).is_file()


def versions(d: Path) -> list[int]:
    """Published versions N of the id folder d (each a folder d/v<N>/<id>), oldest first."""
    try:
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := VERSION_RE.fullmatch(p.name))
                      and not p.is_symlink() and (p / d.name).is_dir() and not (p / d.name).is_symlink())
    except OSError:
        return []


def current(d: Path) -> tuple[Path, int] | None:
    """(folder, version) of what d serves now, or None."""
    if not d.is_dir():
        return None
    if is_flat(d):
        return d, 0
    vs = versions(d)
    return (d / f"v{vs[-1]}" / d.name, vs[-1]) if vs else None


def recover(root: Path) -> None:
    """At start: finish or undo what a crash interrupted, and drop versions only past requests used."""
    for p in root.iterdir():
        if not p.is_dir() or p.is_symlink():
            continue
        if p.name.startswith(".old-"):  # replaced folder: restore it if the new one never landed
            aid = p.name[5:].rsplit("-", 1)[0]
            dest = root / aid
            if ID_RE.fullmatch(aid) and (p / "x").is_dir() and current(dest) is None:
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(p / "x", dest)
        if p.name.startswith((".tmp-", ".del-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
        elif ID_RE.fullmatch(p.name) and not is_flat(p):
            for v in versions(p)[:-1]:
                shutil.rmtree(p / f"v{v}", ignore_errors=True)


def summary(config_bytes: bytes, weights: bytes) -> dict:
    """rank, targets and base model of an adapter, from its config and safetensors header (checks both)."""
    config = parse_lora_config(config_bytes)
    header = parse_header(weights)
    pairs = pair_keys(header)
    mods = {m for _, m in pairs}
    return {"rank": max((header[a][1][0] for a, _ in pairs.values()), default=0),
            "targets": [m for m in MODULES if m in mods],
            "base_model_name_or_path": config.base_model_name_or_path}


def check_tokenizer_config(data: bytes | None) -> None:
    if data is None:
        return
    try:
        ok = len(data) <= MAX_CONFIG_BYTES and isinstance(json.loads(data), dict)
    except (ValueError, UnicodeDecodeError, RecursionError):
        ok = False
    if not ok:
        raise AdapterError(f"{TOKENIZER_FILE} must be a JSON object of at most {MAX_CONFIG_BYTES} bytes",
                           TOKENIZER_FILE)
