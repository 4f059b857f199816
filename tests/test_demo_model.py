"""The embedded demo model: deterministic, atomic, and a normal Hugging Face folder."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

from loramux.server.models.demo import DEMO_NAME, ensure_demo_model
from loramux.server.models.tokenizer import Tokenizer

FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _digest(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def test_folder_contents(demo_dir):
    assert demo_dir.name == DEMO_NAME
    assert sorted(p.name for p in demo_dir.iterdir()) == sorted(FILES)
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (128, 4, 4, 2, 262)
    assert json.loads((demo_dir / "generation_config.json").read_text())["eos_token_id"] == [257, 261]
    assert (demo_dir / "model.safetensors").stat().st_size < 8 << 20
    tcfg = json.loads((demo_dir / "tokenizer_config.json").read_text())
    assert tcfg["add_bos_token"] is True and "add_generation_prompt" in tcfg["chat_template"]


def test_deterministic_idempotent_and_repaired(tmp_path, demo_dir):
    first = ensure_demo_model(tmp_path / "a")
    assert _digest(first) == _digest(demo_dir)  # same bytes in any directory, any run
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path / "a") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    (first / "model.safetensors").unlink()  # a damaged folder is rebuilt
    assert _digest(ensure_demo_model(tmp_path / "a")) == _digest(demo_dir)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [DEMO_NAME]  # no temp folders left


def test_concurrent_starts(tmp_path, demo_dir):
    results, errors = [], []

    def run():
        try:
            results.append(ensure_demo_model(tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert _digest(results[0]) == _digest(demo_dir)
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_NAME]


def test_loads_and_runs_in_transformers(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    hf_tok = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert GenerationConfig.from_pretrained(demo_dir).eos_token_id == [257, 261]
    ours = Tokenizer.from_dir(demo_dir)
    outputs = set()
    for prompt in ["Hello, my name is", "The capital of France is", "1 2 3 4", "abc"]:
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == ours.encode(prompt)
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=257)
        assert torch.isfinite(logits).all() and logits.std() > 1.0  # not a flat distribution
        outputs.add(tuple(out[0, ids.shape[1]:].tolist()))
    assert len(outputs) == 4  # greedy output depends on the prompt
    text = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<s><|user|>hi<|end|><|assistant|>"
