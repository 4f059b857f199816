"""A tiny Llama plus a few PEFT adapters, built once per test module."""
from __future__ import annotations

from pathlib import Path

from hf_models import build_tiny
from peft_adapters import ADAPTER_VARIANTS, build_peft_adapter


def peft_world(tmp: Path, kind: str = "llama", seed: int = 3, variants: list[str] | None = None):
    base = build_tiny(kind, tmp / f"{kind}-base", seed=seed, num_hidden_layers=2)
    names = variants or list(ADAPTER_VARIANTS)
    adapters = {n: build_peft_adapter(base, tmp / f"{kind}-{n}", seed=i + 10, **ADAPTER_VARIANTS[n])
                for i, n in enumerate(names)}
    return base, adapters
