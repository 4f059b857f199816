"""Many adapters on few slots: churn equals PEFT with no leaks and bounded waits; slow loads and copies stall no one."""
from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from adapters_world import peft_world
from engine_helpers import make_engine
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import attach_adapters

MAX_NEW = 6
WAIT_STEPS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base, adapters = peft_world(tmp_path_factory.mktemp("many"), "llama", seed=4)
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(4, 20))] for _ in range(4)]
    return base, adapters, prompts, _peft_reference(base, adapters, prompts)


def _peft_reference(base, adapters: dict, prompts: list) -> dict:
    """(variant or None, prompt index) -> PEFT's greedy tokens; one model load per adapter."""
    import peft
    import transformers as tf

    ref = {}
    for name in [None] + list(adapters):
        model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        if name is not None:
            model = peft.PeftModel.from_pretrained(model, adapters[name]).eval()
        with torch.no_grad():
            for i, p in enumerate(prompts):
                out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False,
                                     eos_token_id=None, pad_token_id=0, min_new_tokens=MAX_NEW)
                ref[(name, i)] = out[0, len(p):].tolist()
    return ref


def _engine(base, tmp, ids: dict, max_loras: int, max_cpu: int, max_seqs: int = 12, num_blocks: int = 64,
            packed_dir=None):
    engine = make_engine(base, max_loras=max_loras, max_seqs=max_seqs, num_blocks=num_blocks, budget=256)
    cfg = dataclasses.replace(engine.scheduler.config, max_adapter_wait_steps=WAIT_STEPS)
    engine.scheduler.config = cfg
    svc = AdapterService(tmp, ModelConfig.from_dir(base).raw, torch.float32, max_loras, 32, max_cpu,
                         packed_dir=packed_dir)
    for name, path in ids.items():
        svc.register_dir(name, path)
    attach_adapters(engine, svc)
    return engine, svc


def _assert_clean(engine, svc):
    assert not engine.has_work() and not engine.requests
    assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
    assert svc.table.idle(), "a slot refcount leaked"
    assert not svc._copying and not svc.device_slots.in_flight()


@pytest.mark.parametrize("packed", [False, True], ids=["folders", "packed-files"])
def test_churn_two_slots_fifty_adapters(world, tmp_path, packed):
    """--max-loras 2, --max-cpu-loras 3, 50 adapter ids (6 PEFT adapters, each under several ids), 500 requests
    in random order at random concurrency (1-12 in flight) from 3 tenants: every output equals PEFT's. With the
    packed store, reloads map the packed file each id's first load wrote."""
    base, adapters, prompts, ref = world
    variants = list(adapters)
    ids = {f"ad{i:02d}": variants[i % len(variants)] for i in range(50)}
    engine, svc = _engine(base, tmp_path / "reg", {k: adapters[v] for k, v in ids.items()}, 2, 3,
                          packed_dir=tmp_path / "packed" if packed else None)
    rng = random.Random(0)
    weights = [1.0 / (k + 1) for k in range(50)]  # Zipf-like popularity, plus base-model requests
    names = list(ids)
    todo = []
    for i in range(500):
        aid = None if rng.random() < 0.1 else rng.choices(names, weights)[0]
        todo.append((f"q{i}", aid, rng.randrange(len(prompts)), rng.randint(1, MAX_NEW), rng.choice("abc")))
    got: dict[str, list[int]] = {}
    want = {rid: ref[(ids.get(aid), p)][:n] for rid, aid, p, n, _ in todo}
    queue, concurrency, steps = list(todo), 4, 0
    deadline = time.monotonic() + 100
    while (queue or engine.has_work()) and time.monotonic() < deadline:
        if steps % 15 == 0:
            concurrency = rng.randint(1, 12)
        while queue and len(engine.requests) < concurrency:
            rid, aid, p, n, tenant = queue.pop(0)
            got[rid] = []
            engine.add_request(rid, prompts[p], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                               aid, tenant)
        for o in engine.step():
            got[o.request_id].extend(o.new_token_ids)
        steps += 1
        if engine.last_step.num_requests == 0:
            time.sleep(0.001)  # an adapter is loading in the background
    assert not queue and not engine.has_work(), "did not finish"
    bad = [rid for rid in want if got[rid] != want[rid]]
    assert not bad, f"{len(bad)} outputs differ from PEFT, e.g. {bad[:5]}"
    _assert_clean(engine, svc)
    st = svc.stats()
    assert st["evictions_total"]["gpu"] > 20 and st["evictions_total"]["cpu"] > 20 and len(svc.cache) <= 3
    assert st["prefetch_hits_total"]["gpu"] > 20 and st["prefetch_hits_total"]["cpu"] > 20
    assert len(svc.loader._futures) <= 3, "finished loads keep evicted weights alive"
    # Fairness bound: WAIT_STEPS passed-over steps, then slots drain to the adapter; with up to 12 requests in
    # flight at most 12 distinct adapters queue for 2 slots (6 rounds), each round at most one prompt step plus
    # MAX_NEW decode steps, plus a few steps for the load itself.
    bound = WAIT_STEPS + 6 * (MAX_NEW + 1) + 10
    assert engine.scheduler.max_blocked_steps <= bound, (engine.scheduler.max_blocked_steps, bound)
    assert st["wait_seconds"]["count"] == sum(1 for t in todo if t[1] is not None)
    if packed:  # every id has its own registry folder, so 50 files at most; the rest of the loads mapped them
        assert 0 < st["packed_writes_total"] <= 50 and st["packed_hits_total"] > 100, st
        assert st["disk_load_phase_seconds"]["map"] > 0


def test_slow_loading_adapter_does_not_stall_others(world, tmp_path, monkeypatch):
    """One adapter's disk load takes 1.5 s: the other requests keep producing tokens every step meanwhile."""
    import loramux.adapters.loading as loading

    base, adapters, prompts, ref = world
    real = loading.load_adapter

    def slow(path, spec, dtype, adapter_id=None, **kw):
        if adapter_id == "slow":
            time.sleep(1.5)
        return real(path, spec, dtype, adapter_id=adapter_id, **kw)

    monkeypatch.setattr(loading, "load_adapter", slow)
    engine, svc = _engine(base, tmp_path / "reg", {"slow": adapters["all-r8"], "fast": adapters["qv-r4"]}, 2, 4)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    engine.add_request("s", prompts[0], SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True),
                       "slow")
    for i, aid in enumerate(["fast", None, "fast"]):
        engine.add_request(f"o{i}", prompts[i + 1], long, aid)
    t0, first_slow, gaps, last, other_tokens = time.monotonic(), None, [], None, 0
    slow_out: list[int] = []
    while engine.has_work() and time.monotonic() - t0 < 60:
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            if o.request_id == "s":
                slow_out += o.new_token_ids
                first_slow = first_slow or now
            elif first_slow is None:
                other_tokens += len(o.new_token_ids)
        if any(o.request_id != "s" and o.new_token_ids for o in outs):
            if last is not None and first_slow is None:
                gaps.append(now - last)
            last = now
        if engine.last_step.num_requests == 0:
            time.sleep(0.001)
        if first_slow is not None and len(slow_out) >= MAX_NEW:
            for i in range(3):
                engine.abort(f"o{i}")
    assert slow_out == ref[("all-r8", 0)]
    assert first_slow - t0 >= 1.4, "the slow adapter was not slow"
    assert other_tokens >= 3 * 20, f"others produced only {other_tokens} tokens while the adapter loaded"
    assert max(gaps) < 0.5, f"other requests stalled for {max(gaps):.2f} s"
    _assert_clean(engine, svc)
    assert svc.stats()["load_latency_seconds"]["disk"]["sum"] >= 1.4


def test_copy_in_flight_is_not_granted_until_ready(world, tmp_path):
    """Asynchronous slot copies (simulated on CPU: ready() stays False for a few polls): the gate grants a slot
    only once its copy is done, the other requests keep running meanwhile, and outputs still equal PEFT's."""
    base, adapters, prompts, ref = world
    engine, svc = _engine(base, tmp_path / "reg", {n: adapters[n] for n in ("qv-r4", "all-r8", "layers-0")}, 2, 4)
    slots = svc.device_slots
    pending: dict[int, int] = {}
    real_start, real_mark = slots.start_load, svc.table.mark_loaded

    def start_load(slot, adapter):
        real_start(slot, adapter)
        pending[slot] = 5

    def ready(slot):
        if pending.get(slot, 0) > 0:
            pending[slot] -= 1
            return False
        return True

    def mark_loaded(aid):
        assert pending.get(svc.table.lookup(aid), 0) == 0, "slot marked usable before its copy completed"
        real_mark(aid)

    slots.start_load, slots.ready, svc.table.mark_loaded = start_load, ready, mark_loaded
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    engine.add_request("base", prompts[3], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    order = [("a", "qv-r4", 0), ("b", "all-r8", 1), ("c", "layers-0", 2), ("d", "qv-r4", 2)]
    for rid, aid, p in order:
        engine.add_request(rid, prompts[p], params, aid)
    got = {rid: [] for rid, _, _ in order}
    base_steps = 0
    while engine.has_work():
        outs = engine.step()
        for o in outs:
            if o.request_id in got:
                got[o.request_id] += o.new_token_ids
        base_steps += any(o.request_id == "base" for o in outs)
    for rid, aid, p in order:
        assert got[rid] == ref[(aid, p)], rid
    assert base_steps == 40  # the base request produced a token in every step, loads notwithstanding
    st = svc.stats()
    assert st["loads_total"]["gpu"] >= 3 and st["waits_total"] > 0
    _assert_clean(engine, svc)


def test_prefetch_fills_free_slots_ahead(world, tmp_path):
    """Waiting requests' adapters are loaded into free slots before admission: later requests hit them."""
    base, adapters, prompts, ref = world
    names = ["qv-r4", "all-r8", "mlp-r16-rs"]
    engine, svc = _engine(base, tmp_path / "reg", {n: adapters[n] for n in names}, 4, 4, max_seqs=1)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(names):
        engine.add_request(f"r{i}", prompts[i], params, n)
    got = {f"r{i}": [] for i in range(3)}
    while engine.has_work():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
        if engine.last_step.num_requests == 0:
            time.sleep(0.001)
    assert all(got[f"r{i}"] == ref[(n, i)][:3] for i, n in enumerate(names))
    st = svc.stats()
    assert st["prefetches_total"]["gpu"] >= 2 and st["prefetch_hits_total"]["gpu"] >= 2, st
    assert st["prefetch_wasted_total"] == 0
    _assert_clean(engine, svc)


def test_prefetch_window_keeps_to_the_cpu_byte_budget(world, tmp_path):
    """Adapters still on disk count at the cached mean size: a deep queue of cold adapters starts only as many
    disk loads as the CPU cache's byte budget holds, so the loads do not evict each other (an ~8x reload storm
    on the H100 when they counted as 0 bytes)."""
    base, adapters, _, _ = world
    names = [f"a{i}" for i in range(8)]
    svc = AdapterService(tmp_path / "reg", ModelConfig.from_dir(base).raw, torch.float32, 2, 32, 8)
    for n in names:
        svc.register_dir(n, adapters["all-r8"])  # same weights: every id has the same size
    keys = [svc.store.key(svc._find(n, None, None)) for n in names]  # no resolve(): it would warm the cache
    size = svc.loader.get_blocking(keys[0], timeout=60).nbytes
    svc.cache.max_bytes = int(2.5 * size)
    svc.prefetch(keys[1:])  # seven cold adapters wanted, room for two beside nothing else wanted
    deadline = time.monotonic() + 60
    while svc.loader.loading() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert svc.loader.loads == 3, svc.loader.loads  # keys[0], then the two the budget holds
    assert svc.cache.stats()["evictions"] <= 1  # only keys[0], which nobody waits for
    svc.close()


def test_prefetch_keeps_few_slot_copies_in_flight(world, tmp_path):
    """Prefetch queues at most max_prefetch_copies slot copies (simulated slow copies on CPU); the rest follow as
    copies complete, in the waiting order."""
    base, adapters, _, _ = world
    names = [f"a{i}" for i in range(6)]
    _, svc = _engine(base, tmp_path / "reg", {n: adapters["qv-r4"] for n in names}, 8, 8)
    keys = [svc.resolve(n) for n in names]
    for k in keys:
        svc.loader.get_blocking(k, timeout=60)
    done: set[int] = set()
    svc.device_slots.ready = lambda slot: slot in done  # copies complete only when the test says so
    svc.prefetch(keys)
    first = list(svc._copying)
    assert first == keys[:svc.max_prefetch_copies]
    done.update(slot for slot, _ in svc._copying.values())
    svc.prefetch(keys)  # the first copies complete; the remaining adapters' copies start
    assert all(svc.table.is_loaded(k) for k in first) and list(svc._copying) == keys[svc.max_prefetch_copies:]
    svc.close()
