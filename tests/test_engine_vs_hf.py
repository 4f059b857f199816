"""Greedy generation through the engine equals transformers token for token (Llama, Mistral, Qwen2)."""
from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import make_engine, run_all
from hf_models import build_tiny, hf_greedy, hf_logits
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import ScheduledBatch

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: build_tiny(kind, tmp_path_factory.mktemp(name), seed=i, **kw)
            for i, (name, (kind, kw)) in enumerate(VARIANTS.items())}


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(models, name):
    engine = make_engine(models[name])
    ids = _prompts(1, seed=7)[0]
    engine.add_request("x", ids, GREEDY)
    batch = engine.scheduler.schedule()
    ours = engine.runner.forward_logits(batch)
    ref = hf_logits(models[name], ids)
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_tokens_match_transformers_batched(models, name):
    prompts = _prompts(5, seed=1)
    ref = [hf_greedy(models[name], p, GREEDY.max_tokens) for p in prompts]
    assert run_all(make_engine(models[name]), prompts, GREEDY) == ref


def test_same_tokens_alone_batched_chunked_and_preempted(models):
    d = models["llama"]
    prompts = _prompts(8, seed=3)
    alone = [run_all(make_engine(d), [p], GREEDY)[0] for p in prompts]
    assert run_all(make_engine(d), prompts, GREEDY) == alone
    assert run_all(make_engine(d, budget=8), prompts, GREEDY) == alone  # tiny chunked prefill
    engine = make_engine(d, num_blocks=8, budget=64)  # 128 cache slots for ~8 x 35 tokens: forces preemption
    assert run_all(engine, prompts, GREEDY) == alone
    preempted = engine.scheduler  # the engine finished; every block is back
    assert engine.blocks.num_free == 8 and not preempted.has_work()


def test_preemption_actually_happens(models):
    engine = make_engine(models["llama"], num_blocks=6, budget=64)
    prompts = _prompts(6, seed=4)
    seen = []
    orig = engine.scheduler.schedule

    def spy() -> ScheduledBatch:
        b = orig()
        seen.extend(b.preempted)
        return b

    engine.scheduler.schedule = spy
    run_all(engine, prompts, GREEDY)
    assert seen, "the workload was meant to overflow the KV cache"


def test_mistral_sliding_window_matches_transformers(tmp_path):
    d = build_tiny("mistral", tmp_path, seed=5, sliding_window=8)
    ids = _prompts(1, seed=9)[0] + list(range(5, 25))
    engine = make_engine(d, budget=16)
    engine.add_request("x", ids, GREEDY)
    chunks = []
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_tokens for r in engine.scheduler.running):
        batch = engine.scheduler.schedule()
        chunks.append(engine.runner.forward_logits(batch))
        for r, n in zip(batch.requests, batch.num_new_tokens):
            r.num_computed_tokens += n
    ours = torch.cat(chunks)
    assert (ours - hf_logits(d, ids)).abs().max().item() < 1e-4
