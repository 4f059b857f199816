"""load_adapter: a PEFT folder on disk -> validated LoadedAdapter with per-module A, B and scale."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MAX_CONFIG_BYTES, LoraConfig, parse_lora_config
from .errors import NOT_FOUND, AdapterError, unsupported
from .safetensors_io import WEIGHTS_FILE, load_safetensors, parse_header, read_bytes
from .spec import BaseModelSpec
from .validate import check_structure, convert

CONFIG_FILE = "adapter_config.json"
MAX_WEIGHTS_BYTES = 4 << 30
# Checkpoint formats that are (or may be) pickles; never opened, only detected to explain the refusal.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class LoadedAdapter:
    adapter_id: str | None
    config: LoraConfig
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, "q_proj") -> (A [r,in], B [out,r])
    scales: dict[tuple[int, str], float]
    max_rank: int
    nbytes: int

    def pin_memory(self) -> "LoadedAdapter":
        """Page-lock every tensor in place (for async host->GPU copies); needs CUDA."""
        self.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in self.weights.items()}
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


def build(config: LoraConfig, data: bytes, spec: BaseModelSpec, dtype: torch.dtype,
          adapter_id: str | None = None) -> LoadedAdapter:
    """Validate weights bytes against config + spec (header first, then values) and cast to `dtype`."""
    pairs = check_structure(parse_header(data), config, spec)
    weights = convert(load_safetensors(data), pairs, dtype)
    scales = {lm: config.scale_for(*lm) for lm in weights}
    nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
    max_rank = max(a.shape[0] for a, _ in weights.values())
    return LoadedAdapter(adapter_id, config, weights, scales, max_rank, nbytes)


def load_adapter(path: Path, spec: BaseModelSpec, dtype: torch.dtype = torch.float32,
                 adapter_id: str | None = None, max_weights_bytes: int = MAX_WEIGHTS_BYTES) -> LoadedAdapter:
    """Load and fully validate a PEFT LoRA folder; every refusal is an AdapterError naming the key/field."""
    path = Path(path)
    cfg_path, weights_path = check_files(path)
    config = read_config(cfg_path)
    data = read_bytes(weights_path, max_weights_bytes, WEIGHTS_FILE)
    return build(config, data, spec, dtype, adapter_id)
