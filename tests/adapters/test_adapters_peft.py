"""PEFT-made adapters load into (A, B, scale) that reproduce PEFT's own LoRA delta exactly."""
from __future__ import annotations

import pytest
import torch

from loramux.adapters.loader import load_adapter
from loramux.adapters.spec import MODULES, BaseModelSpec

from adapter_testlib import LLAMA, QWEN2, hf_model

ALL = list(MODULES)
CASES = {
    "llama-r4-qv": (LLAMA, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-r8-all": (LLAMA, dict(r=8, lora_alpha=16, target_modules=ALL)),
    "qwen2-r16-rslora": (QWEN2, dict(r=16, lora_alpha=16, use_rslora=True,
                                     target_modules=["k_proj", "o_proj", "up_proj"])),
    "llama-regex": (LLAMA, dict(r=4, lora_alpha=4,
                                target_modules=r"model\.layers\.[02]\.(self_attn\.k|mlp\.down)_proj")),
    "llama-regex-suffix": (LLAMA, dict(r=8, lora_alpha=3, target_modules=r".*\.(gate|o)_proj")),
    "qwen2-patterns": (QWEN2, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                   rank_pattern={"q_proj": 8, "layers.1.mlp.up_proj": 16},
                                   alpha_pattern={"v_proj": 32, r"layers\.0\.self_attn\.q_proj": 5})),
    "llama-layers-list": (LLAMA, dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj"],
                                      layers_to_transform=[0, 2])),
    "llama-layers-int": (LLAMA, dict(r=4, lora_alpha=8, target_modules=ALL, layers_to_transform=1)),
    "llama-exclude": (LLAMA, dict(r=4, lora_alpha=8, target_modules=ALL,
                                  exclude_modules=["model.layers.1.self_attn.q_proj", "down_proj"])),
    "llama-fan-in-fan-out": (LLAMA, dict(r=4, lora_alpha=8, target_modules=["q_proj"], fan_in_fan_out=True)),
    "qwen2-all-linear": (QWEN2, dict(r=8, lora_alpha=8, target_modules="all-linear")),
}


def peft_lora_layers(model) -> dict[tuple[int, str], torch.nn.Module]:
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            parts = name.split(".")
            out[(int(parts[parts.index("layers") + 1]), parts[-1])] = mod
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft(case, make_peft):
    cfg, lora = CASES[case]
    model, path = make_peft(cfg, seed=sorted(CASES).index(case), **lora)
    spec = BaseModelSpec.from_hf_config(cfg)
    ad = load_adapter(path, spec, torch.float32, adapter_id=case)
    layers = peft_lora_layers(model)
    assert set(ad.weights) == set(layers) and layers
    for lm, mod in layers.items():
        a, b = ad.weights[lm]
        assert torch.equal(a, mod.lora_A["default"].weight) and torch.equal(b, mod.lora_B["default"].weight)
        assert ad.scales[lm] == pytest.approx(mod.scaling["default"], rel=1e-12)
        assert ad.config.targets(*lm) and ad.config.scale_for(*lm) == ad.scales[lm]
        x = torch.randn(5, spec.modules[lm[1]][0], dtype=torch.float64).float()
        with torch.no_grad():
            want = mod(x) - mod.base_layer(x)
        got = ad.scales[lm] * (x @ a.T) @ b.T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ad.max_rank == max(a.shape[0] for a, _ in ad.weights.values())
    assert ad.nbytes == sum(a.nbytes + b.nbytes for a, b in ad.weights.values())
    assert all(a.is_contiguous() and a.device.type == "cpu" for a, _ in ad.weights.values())
    # weights are views into the packed form (B is strided where a layer's rank is below its module's largest)
    base = ad.packed.buffer.data_ptr()
    assert all(base <= t.data_ptr() < base + ad.packed.buffer.numel() for ab in ad.weights.values() for t in ab)


def test_ranks_from_patterns(make_peft):
    _, path = make_peft(QWEN2, **CASES["qwen2-patterns"][1])
    ad = load_adapter(path, BaseModelSpec.from_hf_config(QWEN2), torch.float32)
    ranks = {lm: a.shape[0] for lm, (a, _) in ad.weights.items()}
    assert ranks[(0, "q_proj")] == ranks[(1, "q_proj")] == 8
    assert ranks[(1, "up_proj")] == 16 and ranks[(0, "up_proj")] == 4 and ranks[(0, "v_proj")] == 4
    assert ad.scales[(0, "v_proj")] == 32 / 4 and ad.scales[(0, "q_proj")] == 5 / 8
    assert ad.scales[(1, "q_proj")] == 8 / 8 and ad.max_rank == 16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_to_serving_dtype(dtype, make_peft):
    model, path = make_peft(LLAMA, **CASES["llama-r4-qv"][1])
    ad = load_adapter(path, BaseModelSpec.from_hf_config(LLAMA), dtype)
    for lm, mod in peft_lora_layers(model).items():
        a, b = ad.weights[lm]
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, mod.lora_A["default"].weight.to(dtype))


def test_half_precision_file_loads_as_fp32(make_peft, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_peft(LLAMA, **CASES["llama-r8-all"][1])
    f = path / "adapter_model.safetensors"
    bf = {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}
    save_file(bf, f)
    ad = load_adapter(path, BaseModelSpec.from_hf_config(LLAMA), torch.float32)
    key = "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"
    assert torch.equal(ad.weights[(2, "down_proj")][1], bf[key].float())


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2, dict(LLAMA, head_dim=32)], ids=["llama", "qwen2", "head_dim"])
def test_spec_matches_hf_modules(cfg):
    spec = BaseModelSpec.from_hf_config(cfg)
    layer = hf_model(cfg).model.layers[0]
    assert spec.num_layers == cfg["num_hidden_layers"]
    for name in MODULES:
        lin = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)
        assert spec.modules[name] == (lin.in_features, lin.out_features), name
