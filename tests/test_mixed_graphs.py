"""Mixed-step graphs (server/runner/mixed_graphs.py) on CPU: steps padded into token buckets and run through the
table-driven attention (Triton interpreter, in a subprocess) give the tokens of plain eager steps, with adapters,
chunked prefill mixed with decode rows, and requests arriving mid-run. The CUDA capture itself is tested on the GPU
(tests/test_engine_gpu.py)."""
from __future__ import annotations

import os
import random

import pytest
import torch

from engine_helpers import make_engine, run_all
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.models.model_config import ModelConfig
from loramux.server.runner.mixed_graphs import default_token_buckets
from loramux.server.runtime import attach_adapters

pytest.importorskip("triton")
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def test_token_buckets():
    assert default_token_buckets(512, 16) == [64, 96, 128, 192, 256, 384, 512]
    assert default_token_buckets(1024, 16)[-5:] == [512, 640, 768, 896, 1024]
    assert default_token_buckets(4096, 64) == [96, 128, 192, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536,
                                              1792, 2048, 2560, 3072, 3584, 4096]
    assert default_token_buckets(100, 200) == [100]


# LoRA through the torch reference, or through the Triton kernels with the opt-in fused expands (their launches
# inside padded buckets: padding tokens carry no adapter and write K/V into the scratch block)
LORA_PATHS = {"torch-lora": {"LORAMUX_TEST_LORA_BACKEND": "torch"},
              "triton-lora-fused": {"LORAMUX_TEST_LORA_BACKEND": "triton", "LORAMUX_FUSED_LORA_MLP": "1",
                                    "LORAMUX_FUSED_LORA_QKV": "1"}}


@pytest.mark.parametrize("path", list(LORA_PATHS))
def test_mixed_steps_in_the_interpreter(path):
    from triton_interp import run_triton_cases

    run_triton_cases(__file__, "table_attention_steps_equal_eager", {"LORAMUX_KERNEL_BACKEND": "", **LORA_PATHS[path]},
                     timeout=900, allow_skips=False)


def _engine(base, adapters, tmp, mixed: bool):
    engine = make_engine(base, num_blocks=48, budget=24, max_seqs=4, max_model_len=128,
                         kernel_backend=os.environ.get("LORAMUX_TEST_LORA_BACKEND", "torch"))
    svc = AdapterService(tmp, ModelConfig.from_dir(base).raw, torch.float32, 4, 16, 8)
    for name, path in adapters.items():
        svc.register_dir(name, path)
    attach_adapters(engine, svc)
    if mixed:
        from loramux.server.runner.mixed_graphs import MixedGraphs

        runner = engine.runner
        # no capture on CPU: replay() runs the bucket's forward eagerly on the same static, padded inputs
        runner.mixed_graphs = MixedGraphs(runner, [8, 16, 24], 4, scratch_block=runner.num_blocks)
    return engine


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs under TRITON_INTERPRET=1 (test_mixed_steps_in_the_interpreter)")
def test_table_attention_steps_equal_eager(tmp_path):
    from adapters_world import peft_world

    base, adapters = peft_world(tmp_path / "w", variants=["qv-r4", "all-r8", "layers-0"])
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(3, 30))] for _ in range(7)]
    names = [rng.choice([None, *adapters]) for _ in prompts]
    outs, counts = [], []
    for mixed in (False, True):
        engine = _engine(base, adapters, tmp_path / f"reg{mixed}", mixed)
        used = []
        if mixed:
            real = engine.runner.mixed_graphs.replay
            engine.runner.mixed_graphs.replay = lambda T, lora, n: used.append((T, lora)) or real(T, lora, n)
        outs.append(run_all(engine, prompts, GREEDY, adapters=names, stagger=2))
        counts.append(used)
    assert outs[1] == outs[0]
    used = counts[1]
    assert len(used) >= 10 and {T for T, _ in used} >= {8, 16, 24} and {lora for _, lora in used} == {False, True}
