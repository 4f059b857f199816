"""Deterministic random PEFT LoRA adapters for the embedded demo model and for tests."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loader import CONFIG_FILE
from .safetensors_io import WEIGHTS_FILE
from .spec import BLOCK_OF, MODULES, BaseModelSpec

# name -> (r, alpha, targets, seed, use_rslora)
DEMO_ADAPTERS = {
    "demo-q-r4": (4, 8.0, ["q_proj", "v_proj"], 1, False),
    "demo-all-r8": (8, 16.0, list(MODULES), 2, False),
    "demo-mlp-r16": (16, 16.0, ["gate_proj", "up_proj", "down_proj"], 3, True),
}
# Target RMS of the LoRA delta relative to the input's RMS: clearly visible, far from overflow.
DELTA_GAIN = 0.3


def write_random_adapter(out_dir: Path, model_config: dict, r: int, alpha: float, targets: list[str],
                         seed: int, layers: list[int] | None = None, use_rslora: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors with seeded A and non-zero B."""
    spec = BaseModelSpec.from_hf_config(model_config)
    bad = [t for t in targets if t not in MODULES]
    if bad:
        raise ValueError(f"unknown target modules {bad}; choose from {MODULES}")
    layer_ids = list(range(spec.num_layers)) if layers is None else sorted(layers)
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layer_ids:
        for module in MODULES:  # fixed order so the bytes depend only on the arguments
            if module not in targets:
                continue
            fin, fout = spec.modules[module]
            # A rows ~ N(0, 1/in): x@A.T has the RMS of x; B sized so scale*B@A has gain DELTA_GAIN.
            a = torch.randn(r, fin, generator=gen) / math.sqrt(fin)
            b = torch.randn(fout, r, generator=gen) * (DELTA_GAIN / (scale * math.sqrt(r)))
            prefix = f"base_model.model.model.layers.{layer}.{BLOCK_OF[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted(targets), "use_rslora": use_rslora, "bias": "none", "use_dora": False,
        "fan_in_fan_out": False, "lora_dropout": 0.0, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None if layers is None else layer_ids,
        "base_model_name_or_path": spec.model_name or None, "inference_mode": True,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def write_demo_adapters(root: Path, model_dir: Path) -> dict[str, Path]:
    """Write the demo adapters for the model in `model_dir` as PEFT folders root/<name>/ (kept if present)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_config = json.loads((Path(model_dir) / "config.json").read_text())
    out = {}
    for name, (r, alpha, targets, seed, rs) in DEMO_ADAPTERS.items():
        dest = root / name
        if not (dest / WEIGHTS_FILE).is_file():
            # Build beside the destination, then rename: an interrupted run never leaves half a folder.
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-demo-{name}-", dir=root))
            try:
                write_random_adapter(tmp, model_config, r, alpha, targets, seed, use_rslora=rs)
                if dest.exists():
                    shutil.rmtree(dest)
                os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        out[name] = dest
    return out
