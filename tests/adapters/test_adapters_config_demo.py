"""LoraConfig matching agrees with PEFT's resolver on every module name; demo adapters are valid and visible."""
from __future__ import annotations

import json
import math

import pytest
import torch

from loramux.adapters.config import parse_lora_config, safe_regex
from loramux.adapters.demo import DEMO_ADAPTERS, write_demo_adapters, write_random_adapter
from loramux.adapters.errors import AdapterError
from loramux.adapters.loader import load_adapter
from loramux.adapters.spec import MODULES, BaseModelSpec, module_path

from adapter_testlib import LLAMA, QWEN2

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.k_proj", "model.layers.1.mlp.up_proj", "down_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["o_proj", "gate_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj"], layers_to_transform=[]),
    dict(target_modules=r".*layers\.(0|12)\..*_proj"),
    dict(target_modules=r"model\.layers\.\d+\.mlp\.(up|down)_proj"),
    dict(target_modules=list(MODULES), exclude_modules=["k_proj", "model.layers.2.mlp.up_proj"]),
    dict(target_modules=list(MODULES), exclude_modules=r".*\.1\.self_attn\..*"),
]
PATTERNS = [{"q_proj": 8, r"layers\.1\..*": 16, "model.layers.2.mlp.down_proj": 2},
            {r"self_attn\.(q|v)_proj": 32, "up_proj": 3}, {"layers.1.self_attn.q_proj": 9, "q_proj": 4}]


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_targets_agree_with_peft(i):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    raw = dict(CONFIGS[i])
    ours = parse_lora_config({"peft_type": "LORA", **raw})
    theirs = LoraConfig(**raw)
    hits = 0
    for layer in range(13):
        for m in MODULES:
            want = bool(check_target_module_exists(theirs, module_path(layer, m)))
            assert ours.targets(layer, m) == want, (raw, layer, m)
            hits += want
    assert hits > 0


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_agree_with_peft(pattern):
    from peft.utils.other import get_pattern_key
    cfg = parse_lora_config({"peft_type": "LORA", "r": 5, "lora_alpha": 7, "target_modules": list(MODULES),
                             "rank_pattern": pattern, "alpha_pattern": pattern})
    for layer in range(3):
        for m in MODULES:
            name = module_path(layer, m)
            want = pattern.get(get_pattern_key(pattern.keys(), name), 5)
            assert cfg.rank_for(layer, m) == want
            assert cfg.alpha_for(layer, m) == pattern.get(get_pattern_key(pattern.keys(), name), 7)
            assert cfg.scale_for(layer, m) == cfg.alpha_for(layer, m) / want


def test_rslora_scale_and_defaults():
    cfg = parse_lora_config(b'{"peft_type": "LORA", "r": 16, "lora_alpha": 8, "target_modules": ["q_proj"],'
                            b' "use_rslora": true}')
    assert cfg.scale_for(0, "q_proj") == 8 / 4 and cfg.max_rank == 16 and cfg.bias == "none"
    cfg = parse_lora_config({"peft_type": "LORA", "target_modules": "all-linear"})
    assert cfg.r == 8 and cfg.lora_alpha == 8 and all(cfg.targets(3, m) for m in MODULES)


@pytest.mark.parametrize("extra", [dict(layers_to_transform=[0]), dict(layers_pattern="layers")])
def test_regex_targets_refuse_layer_filters(extra):
    with pytest.raises(AdapterError, match="cannot be used when target_modules is a regex") as ei:
        parse_lora_config({"peft_type": "LORA", "target_modules": ".*q_proj", **extra})
    assert ei.value.field in extra


@pytest.mark.parametrize("ok", [r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.[qkv]_proj", r"(.*\.)?q_proj"])
def test_ordinary_regexes_allowed(ok):
    assert safe_regex(ok, "target_modules").pattern == ok


@pytest.mark.parametrize("bad", [r"(a+)+", r"(.*)*x", r"(?:a|ab)+c", r"(a)\1", "x" * 600, ""])
def test_dangerous_regexes_refused(bad):
    with pytest.raises(AdapterError) as ei:
        parse_lora_config({"peft_type": "LORA", "target_modules": bad})
    assert ei.value.field == "target_modules" and ei.value.status == 400


def test_demo_adapters(tmp_path, model_dir):
    spec = BaseModelSpec.from_hf_config(LLAMA)
    out = write_demo_adapters(tmp_path / "demo", model_dir)
    assert set(out) == set(DEMO_ADAPTERS) == {"demo-q-r4", "demo-all-r8", "demo-mlp-r16"}
    again = write_demo_adapters(tmp_path / "demo2", model_dir)
    mtimes = {n: (p / "adapter_model.safetensors").stat().st_mtime_ns for n, p in out.items()}
    assert write_demo_adapters(tmp_path / "demo", model_dir) == out  # present ones are kept as they are
    assert mtimes == {n: (p / "adapter_model.safetensors").stat().st_mtime_ns for n, p in out.items()}
    x = torch.randn(16, 64)
    for name, path in out.items():
        for f in ("adapter_config.json", "adapter_model.safetensors"):  # deterministic bytes
            assert (path / f).read_bytes() == (again[name] / f).read_bytes()
        ad = load_adapter(path, spec, torch.float32, adapter_id=name)
        r, alpha, targets, _, rs = DEMO_ADAPTERS[name]
        assert ad.max_rank == r and {m for _, m in ad.weights} == set(targets)
        assert len(ad.weights) == len(targets) * LLAMA["num_hidden_layers"]
        a, b = ad.weights[(0, targets[0])]
        assert ad.scales[(0, targets[0])] == (alpha / math.sqrt(r) if rs else alpha / r)
        if spec.modules[targets[0]][0] == 64:
            delta = ad.scales[(0, targets[0])] * (x @ a.T) @ b.T
            gain = (delta.pow(2).mean() / x.pow(2).mean()).sqrt().item()
            assert 0.1 < gain < 1.0, gain  # visible, yet far from overflow
    assert json.loads((out["demo-mlp-r16"] / "adapter_config.json").read_text())["use_rslora"] is True


def test_random_adapter_layers_and_qwen2(tmp_path):
    d = write_random_adapter(tmp_path / "q", QWEN2, r=2, alpha=4, targets=["k_proj"], seed=3, layers=[1])
    ad = load_adapter(d, BaseModelSpec.from_hf_config(QWEN2))
    assert list(ad.weights) == [(1, "k_proj")] and ad.weights[(1, "k_proj")][1].shape == (12, 2)
    assert bool(ad.weights[(1, "k_proj")][1].abs().sum() > 0)
    with pytest.raises(ValueError):
        write_random_adapter(tmp_path / "x", QWEN2, r=2, alpha=4, targets=["lm_head"], seed=3)
