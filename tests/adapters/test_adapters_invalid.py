"""A corpus of invalid adapters, each one mutation of a valid one, refused with its own message."""
from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.adapters.errors import AdapterError
from loramux.adapters.loader import load_adapter

W, C = "adapter_model.safetensors", "adapter_config.json"
P = "base_model.model.model.layers"
QA, QB = f"{P}.0.self_attn.q_proj.lora_A.weight", f"{P}.0.self_attn.q_proj.lora_B.weight"


def cfg_edit(**kv):
    def f(d: Path):
        c = json.loads((d / C).read_text())
        c.update(kv)
        (d / C).write_text(json.dumps(c))
    return f


def tensors_edit(fn):
    def f(d: Path):
        t = load_file(d / W)
        fn(t)
        save_file({k: v.clone() for k, v in t.items()}, d / W)
    return f


def raw_edit(fn):
    def f(d: Path):
        (d / W).write_bytes(fn((d / W).read_bytes()))
    return f


def pickle_only(d: Path):
    (d / W).unlink()
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))


def set_item(key, value):
    return lambda t: t.__setitem__(key, value)


def poison(key, value):
    def fn(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value
    return fn


def rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


def header_bytes(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


# name -> (mutation, expected status, expected field (None: not checked), message fragment)
CORPUS = {
    "pickle-only": (pickle_only, 422, "adapter_model.bin", "pickle checkpoints are not accepted"),
    "missing-config": (lambda d: (d / C).unlink(), 400, C, "has no adapter_config.json"),
    "bad-json": (lambda d: (d / C).write_text("{'r': 4,"), 400, C, "not valid JSON"),
    "config-not-object": (lambda d: (d / C).write_text("[1, 2]"), 400, C, "must be a JSON object"),
    "peft-type-prefix": (cfg_edit(peft_type="PREFIX_TUNING"), 422, "peft_type", "only LORA"),
    "use-dora": (cfg_edit(use_dora=True), 422, "use_dora", "DoRA"),
    "modules-to-save": (cfg_edit(modules_to_save=["lm_head"]), 422, "modules_to_save", "not supported"),
    "bias-all": (cfg_edit(bias="all"), 422, "bias", "bias='all' is not supported"),
    "layers-pattern": (cfg_edit(layers_pattern="h"), 422, "layers_pattern", "not supported"),
    "r-not-a-number": (cfg_edit(r="eight"), 400, "r", "r must be an integer"),
    "r-mismatch": (cfg_edit(r=8), 400, f"{P}.0.mlp.down_proj.lora_A.weight", "gives r=8"),
    "target-embed": (cfg_edit(target_modules=["q_proj", "embed_tokens"]), 422, "target_modules", "embeddings"),
    "target-unknown": (cfg_edit(target_modules=["c_attn"]), 422, "target_modules", "not a supported LoRA target"),
    "regex-redos": (cfg_edit(target_modules="(a+)+b"), 400, "target_modules", "nested repetition"),
    "regex-invalid": (cfg_edit(rank_pattern={"q_proj(": 8}), 400, "rank_pattern['q_proj(']", "invalid regular"),
    "layers-out-of-range-config": (cfg_edit(layers_to_transform=[0, 5]), 400, "layers_to_transform", "has 3 layers"),
    "truncated": (raw_edit(lambda b: b[: len(b) - 10]), 400, None, "truncated"),
    "truncated-header": (raw_edit(lambda b: b[:20]), 400, W, "truncated"),
    "huge-header-length": (raw_edit(lambda b: struct.pack("<Q", 1 << 40) + b[8:]), 413, W, "exceeds"),
    "header-not-json": (raw_edit(lambda b: header_bytes({})[:8].replace(b"\x02", b"\x04") + b"{oops"), 400, W,
                        "not valid JSON"),
    "overlapping-offsets": (raw_edit(lambda _: header_bytes({
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8)), 400, "b", "overlaps"),
    "int-dtype": (tensors_edit(lambda t: t.__setitem__(QA, t[QA].to(torch.int32))), 400, QA, "I32"),
    "float8-dtype": (tensors_edit(lambda t: t.__setitem__(QB, t[QB].to(torch.float8_e4m3fn))), 400, QB,
                     "unsupported dtype 'F8_E4M3'"),
    "nan": (tensors_edit(poison(QA, float("nan"))), 400, QA, "contains NaN"),
    "inf": (tensors_edit(poison(QB, float("inf"))), 400, QB, "contains Inf"),
    "shape-a": (tensors_edit(lambda t: t.__setitem__(QA, t[QA][:, :63].contiguous())), 400, QA, "expected [r, 64]"),
    "shape-b": (tensors_edit(lambda t: t.__setitem__(QB, torch.zeros(63, 4))), 400, QB, "expected [64, r]"),
    "transposed-a": (tensors_edit(lambda t: t.__setitem__(QA, t[QA].T.contiguous())), 400, QA, "expected [r, 64]"),
    "rank-ab-mismatch": (tensors_edit(lambda t: t.__setitem__(QB, torch.zeros(64, 3))), 400, QB,
                         "its lora_A has rank 4"),
    "missing-b": (tensors_edit(lambda t: t.pop(QB)), 400, QA, "no matching lora_B"),
    "missing-a": (tensors_edit(lambda t: t.pop(QA)), 400, QB, "no matching lora_A"),
    "missing-module": (tensors_edit(lambda t: (t.pop(QA), t.pop(QB))), 400, "model.layers.0.self_attn.q_proj",
                       "has no lora_A/lora_B"),
    "unknown-module": (tensors_edit(rename(QA, QA.replace("q_proj", "rotary_proj"))), 400, None, "unknown module"),
    "module-wrong-block": (tensors_edit(rename(QA, QA.replace("self_attn", "mlp"))), 400, None, "unknown module"),
    "layer-out-of-range": (tensors_edit(lambda t: (t.__setitem__(QA.replace(".0.", ".3."), t[QA]),
                                                   t.__setitem__(QB.replace(".0.", ".3."), t[QB]))), 400,
                           QA.replace(".0.", ".3."), "layer 3 but the base model has 3 layers"),
    "untargeted-module": (tensors_edit(lambda t: (t.__setitem__(QA.replace("q_", "k_"), t[QA][:, :]),
                                                  t.__setitem__(QB.replace("q_", "k_"), t[QB][:32].contiguous()))),
                          400, QA.replace("q_", "k_"), "does not target"),
    "duplicate-default-key": (tensors_edit(lambda t: t.__setitem__(QA.replace("lora_A.", "lora_A.default."),
                                                                   t[QA].clone())), 400, None, "both hold"),
    "embedding-key": (tensors_edit(set_item("base_model.model.model.embed_tokens.lora_embedding_A",
                                            torch.zeros(4, 64))), 422, None, "embeddings or lm_head"),
    "bias-key": (tensors_edit(set_item(QB.replace(".weight", ".bias"), torch.zeros(64))), 422, None, "bias"),
    "dora-key": (tensors_edit(set_item(f"{P}.0.self_attn.q_proj.lora_magnitude_vector", torch.zeros(64))), 422,
                 None, "DoRA"),
    "foreign-key": (tensors_edit(set_item("transformer.h.0.attn.c_attn.lora_A.weight", torch.zeros(4, 64))), 400,
                    "transformer.h.0.attn.c_attn.lora_A.weight", "naming scheme"),
    "no-weights": (lambda d: save_file({}, d / W), 400, W, "holds no LoRA weights"),
}


@pytest.fixture(autouse=True)
def _no_pickle(monkeypatch):
    """Fail loudly if anything in the load path unpickles."""
    def boom(*a, **k):
        raise AssertionError("unpickling attempted")
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


def test_corpus_is_large():
    assert len(CORPUS) >= 15


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_refused(name, valid_dir, llama_spec):
    mutate, status, field, fragment = CORPUS[name]
    load_adapter(valid_dir, llama_spec, torch.float32)  # valid before the mutation
    mutate(valid_dir)
    with pytest.raises(AdapterError) as ei:
        load_adapter(valid_dir, llama_spec, torch.float32)
    err = ei.value
    assert fragment in str(err), str(err)
    assert err.status == status, repr(err)
    if field is not None:
        assert err.field == field, repr(err)
        assert field in str(err) or field in (C, W, "r"), str(err)


def test_rank_above_server_max(valid_dir, llama_spec):
    with pytest.raises(AdapterError, match="exceeds this server's max LoRA rank 2") as ei:
        load_adapter(valid_dir, dataclasses.replace(llama_spec, max_lora_rank=2), torch.float32)
    assert ei.value.field == "r" and ei.value.status == 400
    cfg_edit(rank_pattern={"layers.2.mlp.down_proj": 128})(valid_dir)
    with pytest.raises(AdapterError, match="rank 128") as ei:
        load_adapter(valid_dir, llama_spec, torch.float32)
    assert ei.value.field == "rank_pattern"


def test_fp16_overflow(valid_dir, llama_spec):
    tensors_edit(poison(QB, 1e6))(valid_dir)
    load_adapter(valid_dir, llama_spec, torch.float32)
    with pytest.raises(AdapterError, match="Inf after casting to torch.float16") as ei:
        load_adapter(valid_dir, llama_spec, torch.float16)
    assert ei.value.field == QB


def test_missing_folder_is_404(tmp_path, llama_spec):
    with pytest.raises(AdapterError) as ei:
        load_adapter(tmp_path / "nope", llama_spec)
    assert ei.value.status == 404 and str(tmp_path) not in str(ei.value)


def test_oversized_weights_is_413(valid_dir, llama_spec):
    with pytest.raises(AdapterError, match="limit") as ei:
        load_adapter(valid_dir, llama_spec, max_weights_bytes=1000)
    assert ei.value.status == 413 and ei.value.field == W


def test_valid_still_loads_after_refusals(valid_dir, tmp_path, llama_spec):
    """A refused adapter leaves no state behind: the valid one beside it keeps loading identically."""
    import shutil
    before = load_adapter(valid_dir, llama_spec)
    for name, (mutate, *_) in sorted(CORPUS.items())[:10]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(valid_dir, bad)
        mutate(bad)
        with pytest.raises(AdapterError):
            load_adapter(bad, llama_spec)
    after = load_adapter(valid_dir, llama_spec)
    assert all(torch.equal(before.weights[k][1], after.weights[k][1]) for k in before.weights)


def test_fuzzed_bytes_only_raise_adapter_error(valid_dir, llama_spec):
    """Random corruption of either file is refused as an AdapterError (a 4xx), never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from loramux.adapters.config import parse_lora_config
    from loramux.adapters.loader import build

    weights, config = (valid_dir / W).read_bytes(), (valid_dir / C).read_bytes()
    cfg = parse_lora_config(config)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                               lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                          max_size=4), max_leaves=12)
    keys = st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "bias",
                            "layers_to_transform", "layers_pattern", "exclude_modules", "use_rslora", "peft_type"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(pos=st.integers(0, len(weights) - 1), blob=st.binary(min_size=1, max_size=16),
           cut=st.booleans(), key=keys, value=json_values)
    def run(pos, blob, cut, key, value):
        data = weights[:pos] if cut else weights[:pos] + blob + weights[pos + len(blob):]
        try:
            build(cfg, data, llama_spec, torch.float32)
        except AdapterError:
            pass
        raw = json.loads(config)
        raw[key] = value
        try:
            parse_lora_config(json.dumps(raw).encode()).scale_for(0, "q_proj")
        except AdapterError:
            pass

    run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from loramux.adapters.validate import all_finite

    g = torch.Generator().manual_seed(1)
    big = torch.full((4, 1000), torch.finfo(dtype).max, dtype=dtype)  # finite, though any sum of it overflows
    assert all_finite([torch.randn(3, 7, generator=g).to(dtype), big, torch.empty(0, 5, dtype=dtype)])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for _ in range(5):
            t = torch.randn(64, 129, generator=g).to(dtype)
            t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = bad
            assert not all_finite([torch.ones(3, dtype=dtype), t]), (bad, dtype)
