"""Model folders: sharded safetensors load like single files; bad folders fail with errors naming the problem."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_helpers import make_engine, run_all
from hf_models import build_tiny, hf_logits
from loramux.server.engine.request import SamplingParams
from loramux.server.models.llama import DecoderModel
from loramux.server.models.model_config import ModelConfig, ModelLoadError
from loramux.server.models.weights import load_weights


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("base"), seed=11)


def _load(folder):
    cfg = ModelConfig.from_dir(folder)
    model = DecoderModel(cfg, 256, torch.float32, torch.device("cpu"))
    load_weights(model, folder)
    return model


def test_sharded_checkpoint_matches_transformers(tmp_path):
    import transformers as tf

    src = build_tiny("qwen2", tmp_path / "src", seed=12)
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB", safe_serialization=True)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    engine = make_engine(tmp_path / "sharded")
    ids = list(range(5, 30))
    engine.add_request("x", ids, SamplingParams(max_tokens=1))
    logits = engine.runner.forward_logits(engine.scheduler.schedule())
    assert (logits - hf_logits(src, ids)).abs().max().item() < 1e-4


def test_pickle_only_folder_is_refused_without_unpickling(base, tmp_path, monkeypatch):
    bad = tmp_path / "pickle"
    bad.mkdir()
    shutil.copy(base / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(ModelLoadError, match="pickle checkpoints .*pytorch_model.bin"):
        _load(bad)


def test_missing_config_and_unsupported_architecture(base, tmp_path):
    with pytest.raises(ModelLoadError, match="config.json: missing"):
        ModelConfig.from_dir(tmp_path)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        ModelConfig.from_dir(tmp_path)


def test_shape_mismatch_names_file_and_tensor(base, tmp_path):
    bad = tmp_path / "shape"
    shutil.copytree(base, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the checkpoint has 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensor 'model.layers.0.mlp.(gate|up|down)_proj"):
        _load(bad)


def test_missing_tensor_is_reported(base, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    shutil.copytree(base, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing .*layers.1.qkv_proj"):
        _load(bad)


def test_seeded_sampling_same_alone_and_in_any_batch(base):
    """Per-request noise keyed by (seed, position): a seeded request's tokens ignore its batch mates."""
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = list(range(40, 60))
    alone = run_all(make_engine(base), [prompt], sampled)[0]
    others = [list(range(3, 3 + n)) for n in (5, 17, 33)]
    mates = [SamplingParams(max_tokens=20, temperature=0.7, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    batched = run_all(make_engine(base), others[:1] + [prompt] + others[1:], mates[:1] + [sampled] + mates[1:])
    assert batched[1] == alone
    chunked = run_all(make_engine(base, budget=8), [prompt] + others, [sampled] + mates)  # tiny prefill chunks
    assert chunked[0] == alone
    reseeded = run_all(make_engine(base), [prompt], SamplingParams(**{**sampled.__dict__, "seed": 99}))[0]
    assert reseeded != alone, "a different seed should give a different sample"
