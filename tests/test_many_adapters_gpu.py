"""GPU checks of asynchronous slot copies (side stream + event per slot): same contents as a blocking copy, churn."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from engine_helpers import run_all
from loramux.kernels.lora_layout import b_block
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import attach_adapters, build_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapters_world import peft_world

    return peft_world(tmp_path_factory.mktemp("gpu-many"))


def _engine(base, adapters, tmp, max_loras: int, max_seqs: int = 8, pin: bool = True):
    cfg = ModelConfig.from_dir(base)
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=512, max_model_len=256,
                            max_loras=max_loras, max_adapter_wait_steps=4)
    engine = build_engine(base, cfg, torch.float32, torch.device("cuda"), 256, 128, sched, [])
    svc = AdapterService(tmp, cfg.raw, torch.float32, max_loras, 32, 3)
    svc.cache.pin = pin  # pageable: slot copies pass through the pinned staging buffers
    for name, path in adapters.items():
        svc.register_dir(name, path)
    attach_adapters(engine, svc, async_copies=True)
    assert svc.device_slots.async_copies
    return engine, svc


@pytest.mark.parametrize("pin", [True, False])
def test_async_copy_equals_blocking_copy(world, tmp_path, pin):
    base, adapters = world
    engine, svc = _engine(base, adapters, tmp_path / "r", 4, pin=pin)
    slots = svc.device_slots
    ad = svc.loader.get_blocking("all-r8", timeout=60)
    assert ad.packed is not None and ad.packed.is_pinned == pin
    issued_on, write_packed = [], slots._write_packed
    slots._write_packed = lambda *a: (issued_on.append(threading.get_ident()), write_packed(*a))
    slots.start_load(0, ad)
    deadline = time.monotonic() + 10
    while not slots.ready(0):
        assert time.monotonic() < deadline, "copy never completed"
        time.sleep(0.001)
    assert (slots._staging.nbytes > 0) == (not pin)  # pageable adapters go through the staging buffers
    assert issued_on == [threading.get_ident()]  # issued on the polling (engine) thread, staged or not
    slots._write_packed = write_packed
    slots._write(1, ad, None)  # blocking reference copy on this thread
    torch.cuda.synchronize()
    for layer in engine.runner.model.layers:
        for attr in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            st = getattr(layer, attr).lora
            assert torch.equal(st.ranks[0], st.ranks[1]) and torch.equal(st.scales[0], st.scales[1])
            lin = getattr(layer, attr)
            for i, ri in enumerate(st.ranks[0].tolist()):
                R, lo, hi = slots.max_rank, lin.slice_offsets[i], lin.slice_offsets[i + 1]
                assert torch.equal(st.a[0, i * R:i * R + ri], st.a[1, i * R:i * R + ri])
                assert torch.equal(b_block(st.b[0], lo, hi, ri), b_block(st.b[1], lo, hi, ri))
    assert not slots.in_flight() and slots.last_copy_seconds > 0
    svc.close()


@pytest.mark.parametrize("pin", [True, False])
def test_churn_with_async_copies_equals_all_resident(world, tmp_path, pin):
    base, adapters = world
    ids = {f"{n}-{k}": p for k in range(3) for n, p in adapters.items()}  # 18 ids, 2 slots
    rng = random.Random(0)
    names = [rng.choice(list(ids) + [None]) for _ in range(60)]
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(4, 30))] for _ in names]
    ref_engine, _ = _engine(base, ids, tmp_path / "ref", 16, max_seqs=16)
    expected = run_all(ref_engine, prompts, GREEDY, adapters=names)
    engine, svc = _engine(base, ids, tmp_path / "two", 2, pin=pin)
    assert run_all(engine, prompts, GREEDY, adapters=names) == expected
    assert svc.table.idle() and not svc._copying and not svc.device_slots.in_flight()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    st = svc.stats()
    assert st["loads_total"]["gpu"] > 10 and st["load_latency_seconds"]["gpu"]["count"] == st["loads_total"]["gpu"]
    svc.close()
