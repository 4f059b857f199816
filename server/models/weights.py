"""Load Hugging Face safetensors checkpoints (single or sharded) into a DecoderModel, packing qkv and gate_up."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open

from .model_config import ModelLoadError

log = logging.getLogger("loramux.weights")

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)$")
_NORM_KEY = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")
_PACKED = {"q": ("qkv_proj", 0), "k": ("qkv_proj", 1), "v": ("qkv_proj", 2), "o": ("o_proj", 0),
           "gate": ("gate_up_proj", 0), "up": ("gate_up_proj", 1), "down": ("down_proj", 0)}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read; pickle checkpoints are refused, never opened."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index}: unreadable shard index ({exc})") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if "/" in f.name or not f.is_file():
                raise ModelLoadError(f"{index}: lists shard {f.name!r}, which is missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles)}); loramux loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the model to safetensors first.")
    raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")


def _target(model, key: str):
    """HF key -> (parameter tensor, row slice or None); None for keys to skip."""
    if key in ("model.embed_tokens.weight",):
        return model.embed_tokens.weight, None
    if key == "model.norm.weight":
        return model.norm.weight, None
    if key == "lm_head.weight":
        return (model.lm_head, None) if model.lm_head is not None else None
    m = _NORM_KEY.match(key)
    if m:
        return getattr(model.layers[int(m.group(1))], m.group(2)).weight, None
    m = _LAYER_KEY.match(key)
    if m and m.group(3) in _PACKED:
        layer = int(m.group(1))
        if layer >= len(model.layers):
            raise KeyError(key)
        attr, idx = _PACKED[m.group(3)]
        lin = getattr(model.layers[layer], attr)
        param = lin.weight if m.group(4) == "weight" else lin.bias
        if param is None:
            raise KeyError(key)
        return param, slice(lin.slice_offsets[idx], lin.slice_offsets[idx + 1])
    if key.endswith("rotary_emb.inv_freq"):
        return None
    raise KeyError(key)


def load_weights(model, model_dir: Path, transform=None) -> None:
    """Copy every tensor into place (cast to the model dtype); every parameter must be filled exactly once.
    transform(key, tensor) -> tensor, if given, maps each checkpoint tensor first (a tensor-parallel rank's shard)."""
    files = checkpoint_files(model_dir)
    filled: dict[int, int] = {}
    t0 = time.monotonic()
    for i, path in enumerate(files):
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
        with handle as f:
            for key in f.keys():
                try:
                    target = _target(model, key)
                except KeyError:
                    raise ModelLoadError(f"{path.name}: unexpected tensor {key!r} for this architecture") from None
                if target is None:
                    continue
                param, rows = target
                dst = param.data if rows is None else param.data[rows]
                src = f.get_tensor(key)
                if transform is not None:
                    src = transform(key, src)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ModelLoadError(f"{path.name}: tensor {key!r} has shape {tuple(src.shape)}, "
                                         f"expected {tuple(dst.shape)} from config.json")
                if not src.is_floating_point():
                    raise ModelLoadError(f"{path.name}: tensor {key!r} has non-float dtype {src.dtype}")
                dst.copy_(src)
                filled[id(param)] = filled.get(id(param), 0) + dst.shape[0]
        log.info("loaded weights %d/%d (%s) in %.1fs", i + 1, len(files), path.name, time.monotonic() - t0)
    for name, param in model.named_parameters():  # rows filled must cover each parameter exactly once
        if filled.get(id(param), 0) != param.shape[0]:
            raise ModelLoadError(f"{model_dir}: checkpoint is missing (or repeats) weights for {name}")


@torch.no_grad()
def init_random_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place on the model's device (benchmarks of named shapes; no checkpoint)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)
