"""GPU engine checks (run on the GPU machine): CPU == GPU in fp32, bf16 close to fp32, CUDA graphs == eager."""
from __future__ import annotations

import random

import pytest
import torch

from engine_helpers import run_all
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import attach_adapters, build_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapters_world import peft_world

    return peft_world(tmp_path_factory.mktemp("gpu"))


def _engine(base, adapters, tmp, device: str, dtype, graphs: bool, backend: str = "auto", mixed: bool = False):
    cfg = ModelConfig.from_dir(base)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=256, max_loras=4)
    engine = build_engine(base, cfg, dtype, torch.device(device), 256, 128, sched, [], kernel_backend=backend)
    svc = AdapterService(tmp, cfg.raw, dtype, 4, 32, 16)
    for name, path in adapters.items():
        svc.register_dir(name, path)
    attach_adapters(engine, svc)
    if graphs:
        engine.runner.enable_cuda_graphs(16, 512 if mixed else 0)
    return engine


def _workload():
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(4, 40))] for _ in range(10)]
    return prompts


def test_gpu_fp32_equals_cpu(world, tmp_path):
    base, adapters = world
    names = (list(adapters) + [None] * 10)[:10]
    prompts = _workload()
    cpu = run_all(_engine(base, adapters, tmp_path / "c", "cpu", torch.float32, False, "torch"), prompts, GREEDY,
                  adapters=names)
    gpu = run_all(_engine(base, adapters, tmp_path / "g", "cuda", torch.float32, False), prompts, GREEDY,
                  adapters=names)
    same = sum(a == b for a, b in zip(cpu, gpu))
    assert same >= 9, f"only {same}/10 sequences identical between CPU and GPU fp32"


def test_cuda_graphs_equal_eager(world, tmp_path):
    base, adapters = world
    names = (list(adapters) + [None] * 10)[:10]
    prompts = _workload()
    eager = run_all(_engine(base, adapters, tmp_path / "e", "cuda", torch.bfloat16, False), prompts, GREEDY,
                    adapters=names)
    graphs = run_all(_engine(base, adapters, tmp_path / "g", "cuda", torch.bfloat16, True), prompts, GREEDY,
                     adapters=names)
    assert graphs == eager


def test_step_device_times_by_path(world, tmp_path):
    """ModelRunner.step_times (the many-adapter bench's per-path step times): every sampled step's device time is
    recorded under its path, positive, and recording does not change the tokens."""
    base, adapters = world
    names = (list(adapters) + [None] * 10)[:10]
    prompts = _workload()
    plain = run_all(_engine(base, adapters, tmp_path / "p", "cuda", torch.bfloat16, True), prompts, GREEDY,
                    adapters=names)
    engine = _engine(base, adapters, tmp_path / "t", "cuda", torch.bfloat16, True)
    engine.runner.step_times = {}
    assert run_all(engine, prompts, GREEDY, adapters=names) == plain
    times = engine.runner.step_times
    assert set(times) <= set(engine.runner.step_kinds) and len(times.get("decode_graph", [])) >= 5, times
    assert all(t > 0 for v in times.values() for t in v)


def test_async_decode_equals_sync(world, tmp_path, monkeypatch):
    """Decode steps launched one ahead from the device-side tokens (LORAMUX_ASYNC_DECODE=1, the CUDA default), CUDA
    graphs on: the same tokens as the synchronous engine (no stop tokens, so both run the same batches), greedy and
    seeded sampled rows alike."""
    base, adapters = world
    names = (list(adapters) + [None] * 10)[:10]
    prompts = _workload()
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.8 * (i % 2), top_p=0.9, seed=i, ignore_eos=True)
              for i in range(10)]
    monkeypatch.setenv("LORAMUX_ASYNC_DECODE", "0")
    sync = run_all(_engine(base, adapters, tmp_path / "s", "cuda", torch.bfloat16, True), prompts, params,
                   adapters=names, stagger=2)
    monkeypatch.setenv("LORAMUX_ASYNC_DECODE", "1")
    engine = _engine(base, adapters, tmp_path / "a", "cuda", torch.bfloat16, True)
    assert run_all(engine, prompts, params, adapters=names, stagger=2) == sync
    assert engine.steps_launched_ahead > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_step_graphs_equal_eager(world, tmp_path, dtype):
    """Steps with prefill tokens replay mixed-step graphs (table-driven attention, padded token buckets): the
    same greedy tokens as eager steps (fp32 exactly; bf16 at least 9 of 10 sequences, as kernels differ)."""
    base, adapters = world
    names = (list(adapters) + [None] * 10)[:10]
    prompts = _workload()
    eager = run_all(_engine(base, adapters, tmp_path / "e", "cuda", dtype, False), prompts, GREEDY, adapters=names,
                    stagger=2)
    engine = _engine(base, adapters, tmp_path / "g", "cuda", dtype, True, mixed=True)
    used, real = [], engine.runner.mixed_graphs.replay
    engine.runner.mixed_graphs.replay = lambda T, lora, n: used.append((T, lora)) or real(T, lora, n)
    graphs = run_all(engine, prompts, GREEDY, adapters=names, stagger=2)
    assert len(used) >= 5 and any(lora for _, lora in used), used
    same = sum(a == b for a, b in zip(graphs, eager))
    assert same == 10 if dtype == torch.float32 else same >= 9, (same, graphs, eager)


def test_bf16_logits_close_to_fp32(world, tmp_path):
    base, adapters = world
    name = next(iter(adapters))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = _engine(base, adapters, tmp_path / str(dtype), "cuda", dtype, False)
        engine.add_request("x", _workload()[0], GREEDY, name)
        while True:
            batch = engine.scheduler.schedule()
            if not batch.empty:
                break
        logits[dtype] = engine.runner.forward_logits(batch).float()
    ref = logits[torch.float32]
    rel = (logits[torch.bfloat16] - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
