"""Adapters through the engine equal PEFT's own generation; mixed batches; slot pressure without leaks."""
from __future__ import annotations

import random
import time

import pytest
import torch

from engine_helpers import make_engine, run_all
from adapters_world import peft_world
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import attach_adapters
from peft_adapters import peft_greedy, peft_logits

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def world(request, tmp_path_factory):
    return peft_world(tmp_path_factory.mktemp(request.param), request.param)


def _engine(base, adapters, tmp, max_loras=8, **kw):
    engine = make_engine(base, max_loras=max_loras, **kw)
    svc = AdapterService(tmp, ModelConfig.from_dir(base).raw, torch.float32, max_loras, 32, 16)
    for name, path in adapters.items():
        svc.register_dir(name, path)
    attach_adapters(engine, svc)
    return engine, svc


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(4, 30))] for _ in range(n)]


def test_each_adapter_matches_peft_generation(world, tmp_path):
    base, adapters = world
    engine, svc = _engine(base, adapters, tmp_path / "reg")
    prompt = _prompts(1, seed=5)[0]
    names = list(adapters)
    ours = run_all(engine, [prompt] * len(names), GREEDY, adapters=names)
    for name, got in zip(names, ours):
        assert got == peft_greedy(base, adapters[name], prompt, GREEDY.max_tokens), name
    assert svc.table.idle()


def test_each_adapter_logits_match_peft(world, tmp_path):
    base, adapters = world
    engine, _ = _engine(base, adapters, tmp_path / "reg")
    ids = _prompts(1, seed=6)[0]
    for name, path in adapters.items():
        engine.add_request(name, ids, GREEDY, name)
        deadline = time.monotonic() + 60
        while True:  # the adapter loads in the background; the scheduler admits it once ready
            batch = engine.scheduler.schedule()
            if not batch.empty or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert not batch.empty, f"adapter {name} never became ready"
        logits = engine.runner.forward_logits(batch)
        engine.abort(name)
        diff = (logits - peft_logits(base, path, ids)).abs().max().item()
        assert diff < 1e-4, (name, diff)


def test_mixed_batch_equals_alone(world, tmp_path):
    base, adapters = world
    names = list(adapters) + [None, None]
    prompts = _prompts(len(names), seed=7)
    alone = []
    for p, a in zip(prompts, names):
        engine, _ = _engine(base, adapters, tmp_path / f"alone-{a}")
        alone.append(run_all(engine, [p], GREEDY, adapters=[a])[0])
    engine, svc = _engine(base, adapters, tmp_path / "mixed")
    assert run_all(engine, prompts, GREEDY, adapters=names) == alone
    assert svc.table.idle()


def test_two_slots_eight_adapters_random_interleaving(tmp_path):
    base, adapters = peft_world(tmp_path, "llama", seed=4)
    extra = {f"{n}-copy": p for n, p in list(adapters.items())[:2]}  # 8 ids in all
    adapters = {**adapters, **extra}
    rng = random.Random(0)
    names = [rng.choice(list(adapters) + [None]) for _ in range(20)]
    prompts = _prompts(len(names), seed=8)
    ref_engine, _ = _engine(base, adapters, tmp_path / "ref", max_loras=8)
    expected = [run_all(ref_engine, [p], GREEDY, adapters=[a])[0] for p, a in zip(prompts, names)]
    engine, svc = _engine(base, adapters, tmp_path / "two", max_loras=2, max_seqs=6)
    assert run_all(engine, prompts, GREEDY, adapters=names) == expected
    assert svc.table.idle(), "a slot refcount leaked"
    assert svc.stats()["evictions_total"]["gpu"] > 0
