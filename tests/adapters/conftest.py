"""Shared fixtures for adapter tests: tiny model configs and PEFT-made adapters."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loramux.adapters.demo import write_random_adapter
from loramux.adapters.spec import BaseModelSpec

from adapter_testlib import LLAMA, hf_model


@pytest.fixture
def make_peft(tmp_path):
    """(cfg, seed, **LoraConfig kwargs) -> (peft model, saved adapter dir); B is non-zero."""
    def make(cfg: dict, seed: int = 0, **lora):
        import warnings

        from peft import LoraConfig, get_peft_model
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(hf_model(cfg), LoraConfig(init_lora_weights=False, **lora)).eval()
            out = tmp_path / f"peft-{seed}-{len(list(tmp_path.iterdir()))}"
            model.save_pretrained(out)
        return model, out
    return make


@pytest.fixture
def llama_spec() -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(LLAMA)


@pytest.fixture
def valid_dir(tmp_path) -> Path:
    """A valid r=4 adapter on q/v/down of every layer of the tiny Llama."""
    return write_random_adapter(tmp_path / "valid", LLAMA, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                seed=7)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d
