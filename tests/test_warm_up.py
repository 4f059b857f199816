"""Eager-step kernel warm-up (server/runner/warm_up.py): bounded variants, no cache touched, outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine, run_all
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.models.model_config import ModelConfig
from loramux.server.runner.warm_up import warm_up, warm_up_sizes
from loramux.server.runtime import attach_adapters

pytest.importorskip("triton")  # launch plans come from the Triton wrapper (pure host math, no kernel runs here)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapters_world import peft_world

    return peft_world(tmp_path_factory.mktemp("warm"), variants=["all-r8", "qv-r4"])


def _engine(base, adapters, tmp):
    engine = make_engine(base, num_blocks=32, budget=300, max_model_len=128)
    svc = AdapterService(tmp, ModelConfig.from_dir(base).raw, torch.float32, 2, 16, 4)
    for name, path in adapters.items():
        svc.register_dir(name, path)
    attach_adapters(engine, svc)
    return engine, svc


def test_prefill_launch_variants_are_few_at_real_shapes(monkeypatch):
    """Llama-3-8B groups, T up to 8192 on a 132-SM GPU: a handful of compiles per group, not one per split-K."""
    from loramux.kernels import lora_triton

    monkeypatch.setattr(lora_triton, "_num_sms", lambda device: 132)
    for K, L in ((4096, 3), (4096, 1), (4096, 2), (14336, 1)):
        for R in (16, 64):
            plans = {lora_triton.launch_key(T, K, L, R, torch.device("cuda"))[2:] for T in range(1, 8193)}
            assert len(plans) <= 8, (K, L, R, len(plans))


def test_warm_up_covers_every_key_and_touches_no_cache(world, tmp_path):
    base, adapters = world
    engine, svc = _engine(base, adapters, tmp_path / "reg")
    runner = engine.runner
    sizes = warm_up_sizes(runner, 300)
    assert sizes[0] == 1 and len(sizes) < 40 and all(1 <= t <= 300 for t in sizes)
    assert 16 in sizes and any(t > runner.max_model_len for t in sizes)  # % 16 and multi-sequence steps
    before = [(k[:-1].clone(), v[:-1].clone()) for k, v in runner.kv_caches]  # all but the scratch block
    assert warm_up(runner, 300) == 2 * len(sizes)  # with and without adapters
    for (k0, v0), (k, v) in zip(before, runner.kv_caches):
        assert torch.equal(k0, k[:-1]) and torch.equal(v0, v[:-1])
    svc.close()


def test_outputs_are_the_same_after_warm_up(world, tmp_path):
    base, adapters = world
    prompts = [[5, 9, 2, 7], [3] * 20, [8, 1, 4]]
    names = ["all-r8", None, "qv-r4"]
    cold, svc1 = _engine(base, adapters, tmp_path / "a")
    want = run_all(cold, prompts, GREEDY, adapters=names)
    warm, svc2 = _engine(base, adapters, tmp_path / "b")
    warm_up(warm.runner, 300)
    assert run_all(warm, prompts, GREEDY, adapters=names) == want
    svc1.close()
    svc2.close()
