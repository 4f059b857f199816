"""Tensor parallelism on CPU (gloo, 2 processes): greedy tokens and logits equal the single-process engine."""
from __future__ import annotations

import functools
import os
import random

import pytest
import torch

from adapters_world import peft_world
from engine_helpers import make_engine, run_all
from hf_models import build_tiny, hf_logits
from loramux.server.adapter_service import AdapterService
from loramux.server.distributed.tp_worker import TPEngineSpec, build_driver_engine, launch_offline
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import attach_adapters
from peft_adapters import ADAPTER_VARIANTS, build_peft_adapter

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
MAX_LORAS = 8
DEVICE = os.environ.get("LORAMUX_TP_TEST_DEVICE", "cpu")  # "cuda": the same checks over NCCL, one GPU per rank


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randint(4, 30))] for _ in range(n)]


def _service(base, adapters, reg):
    svc = AdapterService(reg, ModelConfig.from_dir(base).raw, torch.float32, MAX_LORAS, 32, 16)
    for name, path in adapters.items():
        svc.register_dir(name, path)
    return svc


def _driver(spec, tp, adapters, prompts, names, reg):
    """Rank 0 of the TP group: logits of one prompt, base-model greedy batch, then a mixed adapter batch."""
    engine = build_driver_engine(spec, tp, _service(spec.model_dir, adapters, reg) if adapters else None)
    engine.add_request("logits", prompts[0], GREEDY)
    logits = engine.runner.forward_logits(engine.scheduler.schedule())
    engine.abort("logits")
    out = {"logits": logits.cpu(), "base": run_all(engine, prompts, GREEDY)}
    if adapters:
        out["mixed"] = run_all(engine, prompts, GREEDY, adapters=names)
    return out


def _single(base, adapters, prompts, names, reg):
    engine = make_engine(base, max_loras=MAX_LORAS)
    out = {"base": run_all(engine, prompts, GREEDY)}
    if adapters:
        attach_adapters(engine, _service(base, adapters, reg))
        out["mixed"] = run_all(engine, prompts, GREEDY, adapters=names)
    return out


def _check(tmp, base, adapters):
    names = list(adapters) + [None, None]
    prompts = _prompts(len(names), seed=11)
    spec = TPEngineSpec(base, device=DEVICE, max_loras=MAX_LORAS if adapters else 0,
                        sched=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512, max_model_len=256,
                                              max_loras=MAX_LORAS))
    driver = functools.partial(_driver, adapters=adapters, prompts=prompts, names=names, reg=tmp / "reg-tp")
    tp2 = launch_offline(2, spec, driver, tmp)
    tp1 = _single(base, adapters, prompts, names, tmp / "reg-1")
    assert (tp2["logits"].cpu() - hf_logits(base, prompts[0])).abs().max().item() < 1e-4
    assert tp2["base"] == tp1["base"]
    if adapters:
        assert tp2["mixed"] == tp1["mixed"]
        assert tp2["mixed"] != tp2["base"]  # the adapters really changed something


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tp2_equals_tp1_with_mixed_adapters(tmp_path, kind):
    base, adapters = peft_world(tmp_path, kind)  # Llama: GQA 4 heads / 2 KV heads; Qwen2: qkv bias
    _check(tmp_path, base, adapters)


def test_tp2_with_one_kv_head_replicated(tmp_path):
    base = build_tiny("llama", tmp_path / "mqa", seed=5, num_key_value_heads=1, tie_word_embeddings=True,
                      vocab_size=301)  # odd vocab: the last rank's embedding shard is padded
    adapters = {n: build_peft_adapter(base, tmp_path / n, seed=20 + i, **ADAPTER_VARIANTS[n])
                for i, n in enumerate(["all-r8", "patterns"])}
    _check(tmp_path, base, adapters)


def test_serve_tensor_parallel_bad_setup_exits_2_and_stops_workers(tmp_path):
    """serve with N > 1 starts its workers; a setup error (random weights cannot be sharded) stops them again.
    The serving path itself is tested in test_tensor_parallel_serve.py."""
    import multiprocessing

    from loramux.server.cli import build_parser, config_from_args, serve

    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2", "--cache-dir", str(tmp_path),
                                      "--model", "random:tiny", "--device", "cpu"])
    config = config_from_args(args)
    assert config.tensor_parallel_size == 2
    assert serve(config) == 2
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("loramux-tp")]
