"""load_adapter: a PEFT folder on disk -> validated LoadedAdapter with per-module A, B and scale."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MAX_CONFIG_BYTES, LoraConfig, parse_lora_config
from .errors import NOT_FOUND, AdapterError, unsupported
from .safetensors_io import WEIGHTS_FILE, load_safetensors, parse_layout, read_bytes, read_reusing
from .spec import BaseModelSpec
from .packed import PackedAdapter, PackedViews, pack
from .validate import all_finite, check_finite, check_structure

CONFIG_FILE = "adapter_config.json"
MAX_WEIGHTS_BYTES = 4 << 30
# Checkpoint formats that are (or may be) pickles; never opened, only detected to explain the refusal.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class LoadedAdapter:
    adapter_id: str | None
    config: LoraConfig
    weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, "q_proj") -> (A [r,in], B [out,r])
    scales: dict[tuple[int, str], float]
    max_rank: int
    nbytes: int
    num_layers: int = 0  # of the base model (0: unknown, then the highest layer named + 1)
    packed: PackedAdapter | None = None  # slot-ready form; `weights` are views into it when set

    def pin_memory(self) -> "LoadedAdapter":
        """Page-lock the weights (for async host->GPU copies; needs CUDA): packs them into one pinned buffer."""
        if self.packed is not None and self.packed.is_pinned:
            return self
        if self.packed is not None:
            packed = self.packed.pinned()
            if isinstance(self.weights, PackedViews):
                self.weights = self.weights.over(packed)
            else:
                self.weights = {lm: packed.view(*lm, a.shape[0]) for lm, (a, _) in self.weights.items()}
            self.packed = packed
        else:
            self.pack(pin=True)
        return self

    def unpacked(self) -> "LoadedAdapter":
        """A copy whose weights own their memory and has no packed form: pickling a view would serialize the
        whole packed buffer once per tensor (tensor parallelism sends adapters to worker ranks)."""
        weights = {lm: (a.clone(), b.clone()) for lm, (a, b) in self.weights.items()}
        return dataclasses.replace(self, weights=weights, packed=None)

    def pack(self, pin: bool = False) -> "LoadedAdapter":
        """Build the packed form (weights become views into it; their values are unchanged)."""
        layers = self.num_layers or 1 + max((layer for layer, _ in self.weights), default=0)
        dtype = next(iter(self.weights.values()))[0].dtype if self.weights else torch.float32
        self.packed, self.weights = pack(self.weights, self.scales, layers, dtype, pin)
        return self


def check_files(path: Path) -> tuple[Path, Path]:
    """-> (config path, weights path); refuses pickle-only folders and missing files."""
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path.name!r} does not exist", None, NOT_FOUND)
    cfg, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise unsupported(f"{pickles[0]}: pickle checkpoints are not accepted; convert the adapter to "
                              f"{WEIGHTS_FILE}", pickles[0])
        raise AdapterError(f"the adapter has no {WEIGHTS_FILE}", WEIGHTS_FILE)
    if not cfg.is_file():
        raise AdapterError(f"the adapter has no {CONFIG_FILE}", CONFIG_FILE)
    return cfg, weights


def read_config(path: Path) -> LoraConfig:
    return parse_lora_config(read_bytes(path, MAX_CONFIG_BYTES, CONFIG_FILE))


def build(config: LoraConfig, data: bytes | memoryview, spec: BaseModelSpec, dtype: torch.dtype,
          adapter_id: str | None = None, pin: bool = False, phases: Counter | None = None) -> LoadedAdapter:
    """Validate weights bytes against config + spec (header first, then values), cast to `dtype` straight into
    the packed form (pinned with pin=True, falling back to pageable memory when page-locking fails).
    phases: seconds per step ("decode", "alloc", "pack", "check") are added to it."""
    t0 = time.perf_counter()
    layout = parse_layout(data)
    pairs = check_structure(layout[0], config, spec)
    tensors = load_safetensors(data, layout=layout)
    weights = {lm: (tensors[ka], tensors[kb]) for lm, (ka, kb) in pairs.items()}
    scales = {lm: config.scale_for(*lm) for lm in weights}
    phases = Counter() if phases is None else phases
    phases["decode"] += time.perf_counter() - t0
    try:
        packed, views = pack(weights, scales, spec.num_layers, dtype, pin, phases)
    except RuntimeError:  # page-locked memory exhausted: pageable still works, only uploads are slower
        packed, views = pack(weights, scales, spec.num_layers, dtype, False, phases)
    t0 = time.perf_counter()
    if not all_finite([*packed.a.values(), *packed.b.values()]):
        check_finite(tensors, pairs, dtype)  # names the tensor; passes only if a finite sum overflowed
    phases["check"] += time.perf_counter() - t0
    nbytes, max_rank = views.nbytes, max(views.ranks.values())
    return LoadedAdapter(adapter_id, config, views, scales, max_rank, nbytes, spec.num_layers, packed)


def load_adapter(path: Path, spec: BaseModelSpec, dtype: torch.dtype = torch.float32,
                 adapter_id: str | None = None, max_weights_bytes: int = MAX_WEIGHTS_BYTES,
                 pin: bool = False, phases: Counter | None = None) -> LoadedAdapter:
    """Load and fully validate a PEFT LoRA folder; every refusal is an AdapterError naming the key/field.
    phases: seconds per step ("read" and those of build()) are added to it."""
    t0 = time.perf_counter()
    path = Path(path)
    cfg_path, weights_path = check_files(path)
    config = read_config(cfg_path)
    data = read_reusing(weights_path, max_weights_bytes, WEIGHTS_FILE)  # build() copies out before it returns
    if phases is not None:
        phases["read"] += time.perf_counter() - t0
    return build(config, data, spec, dtype, adapter_id, pin, phases)
