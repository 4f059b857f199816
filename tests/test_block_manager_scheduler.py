"""Block manager and scheduler without torch: no leaks under random add/abort/finish, preemption, budgets."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, RequestStatus, SamplingParams
from loramux.server.engine.scheduler import Scheduler, SchedulerConfig


def _req(i: int, prompt_len: int, max_tokens: int = 8, adapter: str | None = None) -> Request:
    return Request(f"r{i}", list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), adapter)


class FakeGate:
    """Slots as a dict of refcounts; acquire fails when max distinct adapters are held."""

    def __init__(self, slots: int):
        self.slots, self.refs = slots, {}

    def try_acquire(self, aid):
        if aid not in self.refs and len(self.refs) >= self.slots:
            return False
        self.refs[aid] = self.refs.get(aid, 0) + 1
        return True

    def release(self, aid):
        self.refs[aid] -= 1
        assert self.refs[aid] >= 0
        if self.refs[aid] == 0:
            del self.refs[aid]


def _run_step(s: Scheduler, rng: random.Random) -> list[Request]:
    """Simulate the engine: advance computed tokens, emit a token when a request reaches its end."""
    batch = s.schedule()
    assert batch.num_tokens <= s.config.max_num_batched_tokens
    assert len(s.running) <= s.config.max_num_seqs
    adapters = {r.adapter_id for r in s.running if r.adapter_id}
    assert len(adapters) <= s.config.max_loras
    done = []
    for req, n in zip(batch.requests, batch.num_new_tokens):
        assert len(req.block_ids) * s.blocks.block_size >= req.num_computed_tokens + n
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(rng.randrange(100))
            if len(req.output_token_ids) >= req.params.max_tokens:
                s.finish(req, RequestStatus.FINISHED_LENGTH)
                done.append(req)
    return done


def test_block_manager_allocate_and_free():
    bm = BlockManager(num_blocks=4, block_size=16)
    r = _req(0, 20)
    assert bm.allocate(r, 20) and len(r.block_ids) == 2
    r.num_computed_tokens = 20
    assert bm.allocate(r, 12) and len(r.block_ids) == 2  # 32 tokens still fit in 2 blocks
    assert bm.allocate(r, 13) and len(r.block_ids) == 3
    assert not bm.allocate(_req(1, 40), 40)  # needs 3, only 1 free: nothing taken
    assert bm.num_free == 1
    bm.free(r)
    assert bm.num_free == 4 and r.block_ids == []
    bm.check_consistent()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(4, 40), budget=st.integers(4, 64),
       max_seqs=st.integers(1, 8), max_loras=st.integers(1, 3))
def test_random_workload_never_leaks(seed, num_blocks, budget, max_seqs, max_loras):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size=4)
    gate = FakeGate(max_loras)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=4 * num_blocks,
                          max_loras=max_loras, max_adapter_wait_steps=5)
    s = Scheduler(cfg, bm, gate)
    live, n = {}, 0
    for _ in range(300):
        op = rng.random()
        if op < 0.2:
            prompt = rng.randint(1, min(12, 4 * num_blocks - 9))
            req = _req(n, prompt, rng.randint(1, 8), rng.choice([None, "a", "b", "c", "d"]))
            s.add(req)
            live[req.request_id] = req
            n += 1
        elif op < 0.3 and live:
            rid = rng.choice(sorted(live))
            s.abort(rid)
            live.pop(rid)
        else:
            for req in _run_step(s, rng):
                live.pop(req.request_id, None)
        bm.check_consistent()
        held = sum(len(r.block_ids) for r in s.running)
        assert held + bm.num_free == num_blocks
        assert all(not r.block_ids for r in s.waiting)
    for rid in list(live):
        s.abort(rid)
    assert bm.num_free == num_blocks and not gate.refs and not s.has_work()


def test_preemption_when_blocks_run_out_and_everyone_finishes():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=6, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=24), bm)
    reqs = [_req(i, 6, max_tokens=10) for i in range(4)]
    for r in reqs:
        s.add(r)
    preempted = 0
    for _ in range(500):
        if not s.has_work():
            break
        batch_before = [r.num_preemptions for r in reqs]
        _run_step(s, rng)
        preempted += sum(r.num_preemptions for r in reqs) - sum(batch_before)
    assert not s.has_work()
    assert preempted > 0, "4 x 16 tokens cannot fit in 24 cache slots without preemption"
    assert all(len(r.output_token_ids) == 10 for r in reqs)
    assert bm.num_free == 6


def test_chunked_prefill_respects_budget():
    bm = BlockManager(num_blocks=64, block_size=16)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8, max_model_len=512), bm)
    r = _req(0, 30)
    s.add(r)
    sizes = []
    for _ in range(4):
        batch = s.schedule()
        sizes.append(batch.num_new_tokens[0])
        r.num_computed_tokens += batch.num_new_tokens[0]
    assert sizes == [8, 8, 8, 6]


def test_adapter_slots_bound_and_no_starvation():
    """With one slot and a steady stream for adapter 'a', a request for 'b' still gets in within the bound."""
    rng = random.Random(1)
    gate = FakeGate(1)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256, max_loras=1,
                                  max_adapter_wait_steps=10), BlockManager(256, 16), gate)
    b = _req(999, 4, max_tokens=2, adapter="b")
    s.add(_req(0, 4, max_tokens=6, adapter="a"))
    s.add(b)
    n = 1
    for step in range(200):
        s.add(_req(n, 4, max_tokens=6, adapter="a"))
        n += 1
        _run_step(s, rng)
        if b.status.finished:
            break
    assert b.status.finished, "the request for adapter b starved"
    assert step < 40

