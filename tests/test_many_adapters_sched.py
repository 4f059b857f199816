"""Adapter-aware admission without torch: tenant fair share, resident-first within the bound, draining, prefetch."""
from __future__ import annotations

import random

import pytest

from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.request import Request, RequestStatus, SamplingParams
from loramux.server.engine.scheduler import Scheduler, SchedulerConfig
from test_block_manager_scheduler import FakeGate


class Gate(FakeGate):
    """FakeGate's refcounted slots; `resident` adapters count as loaded; records prefetch calls."""

    def __init__(self, slots: int, resident: set[str] | None = None):
        super().__init__(slots)
        self.resident, self.prefetched = set(resident or ()), []
        self.waits: list[float] = []

    def try_acquire(self, aid):
        if not super().try_acquire(aid):
            return False
        self.resident.add(aid)
        return True

    def is_resident(self, aid):
        return aid in self.resident

    def prefetch(self, wanted, urgent):
        self.prefetched.append((list(wanted), set(urgent)))

    def admitted(self, aid, waited):
        self.waits.append(waited)


def _sched(gate, seqs=4, loras=2, wait=4, blocks=512) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=256, max_model_len=256, max_loras=loras,
                          max_adapter_wait_steps=wait)
    return Scheduler(cfg, BlockManager(blocks, 16), gate)


def _req(rid: str, adapter=None, tenant=None, max_tokens=4) -> Request:
    return Request(rid, [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens), adapter, tenant=tenant)


def _step(s: Scheduler, admitted: list[str]) -> None:
    """One engine step: every scheduled request reaches its end and emits a token; finished ones leave."""
    before = {r.request_id for r in s.running}
    batch = s.schedule()
    assert len({r.adapter_id for r in s.running if r.adapter_id}) <= s.config.max_loras
    admitted += [r.request_id for r in batch.requests if r.request_id not in before]
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(7)
            if len(req.output_token_ids) >= req.params.max_tokens:
                s.finish(req, RequestStatus.FINISHED_LENGTH)


def test_tenant_fair_share_under_overload():
    """Tenant a queues 12 sequences before tenant b's 4; with 4 sequence slots both get 2 at once."""
    s = _sched(None)
    for i in range(12):
        s.add(_req(f"a{i}", tenant="a"))
    for i in range(4):
        s.add(_req(f"b{i}", tenant="b"))
    admitted: list[str] = []
    _step(s, admitted)
    assert sorted(admitted) == ["a0", "a1", "b0", "b1"]
    while s.has_work():
        _step(s, admitted)
    assert admitted.index("b3") < admitted.index("a5")  # b is not served after all of a's backlog


def test_resident_adapters_first_but_cold_one_within_bound():
    """One sequence slot; a cold adapter's request queued first is overtaken by its tenant's requests for a
    resident adapter at most max_adapter_wait_steps times."""
    gate = Gate(slots=2, resident={"hot"})
    s = _sched(gate, seqs=1, wait=3)
    s.add(_req("cold0", "cold"))
    for i in range(8):
        s.add(_req(f"hot{i}", "hot"))
    admitted: list[str] = []
    while s.has_work():
        _step(s, admitted)
    assert admitted.index("cold0") == 3, admitted
    assert s.max_blocked_steps == 3 and len(gate.waits) == 9 and not gate.refs


def test_drain_keeps_other_adapters_admitting():
    """Two slots held by adapters a (long requests) and b (short); c waits past the bound: only b, with the
    least work left, stops taking requests; a keeps being admitted; c gets b's slot once b drains."""
    gate = Gate(slots=2)
    s = _sched(gate, seqs=8, wait=2)
    s.add(_req("a0", "a", max_tokens=40))
    s.add(_req("b0", "b", max_tokens=6))
    admitted: list[str] = []
    _step(s, admitted)
    s.add(_req("c0", "c", max_tokens=2))
    n = 0
    for _ in range(30):
        n += 1
        s.add(_req(f"a{n}", "a", max_tokens=40))
        s.add(_req(f"b{n}", "b", max_tokens=6))
        _step(s, admitted)
        if "c0" in admitted:
            break
    assert "c0" in admitted and n <= 2 + 6 + 2, (n, admitted)
    drained = admitted[admitted.index("b2") + 1:admitted.index("c0")]
    assert not [r for r in drained if r.startswith("b")], "b kept taking requests while c starved"
    assert sum(r.startswith("a") for r in drained) >= 3, "a stopped being admitted (batch not kept full)"


@pytest.mark.parametrize("seed", range(4))
def test_many_adapters_bounded_waits_and_no_leaks(seed):
    """20 adapters (Zipf), 2 slots, random arrivals, tenants and lengths: every request finishes, nothing leaks,
    and no request is passed over for its adapter much longer than the bound plus the drain of a slot."""
    rng = random.Random(seed)
    gate = Gate(slots=2)
    s = _sched(gate, seqs=6, wait=5, blocks=256)
    admitted: list[str] = []
    n = 0
    for step in range(3000):
        if n < 300 and rng.random() < 0.7:
            s.add(_req(f"r{n}", f"ad{min(int(rng.paretovariate(1.0)) - 1, 19)}", rng.choice("xyz"),
                       max_tokens=rng.randint(1, 6)))
            n += 1
        _step(s, admitted)
        if n >= 300 and not s.has_work():
            break
    assert not s.has_work() and len(admitted) == 300
    assert s.blocks.num_free == 256 and not gate.refs
    assert s.max_blocked_steps <= 5 + 2 * (6 + 1), s.max_blocked_steps  # the bound + two drains (seen: 7-10)


def test_prefetch_hint_lists_urgent_adapters_first():
    gate = Gate(slots=1)
    s = _sched(gate, seqs=8, wait=1)
    s.add(_req("x0", "x", max_tokens=20))
    admitted: list[str] = []
    _step(s, admitted)
    for rid, aid in (("y0", "y"), ("z0", "z"), ("y1", "y"), ("w0", None)):
        s.add(_req(rid, aid))
    _step(s, admitted)  # x holds the only slot: y and z are refused
    _step(s, admitted)
    wanted, urgent = gate.prefetched[-1]
    assert wanted == ["y", "z"] and urgent == {"y", "z"}
    s.add(_req("v0", "v"))
    _step(s, admitted)
    assert gate.prefetched[-1][0] == ["y", "z", "v"] and "w0" in admitted


def test_base_model_requests_are_never_held_back():
    """While slots drain for an adapter past the bound, base-model requests (no slot needed) keep coming in."""
    gate = Gate(slots=1)
    s = _sched(gate, seqs=8, wait=1)
    s.add(_req("a0", "a", max_tokens=10))
    admitted: list[str] = []
    _step(s, admitted)
    s.add(_req("b0", "b"))
    for i in range(6):
        s.add(_req(f"base{i}", None))
        _step(s, admitted)
        assert f"base{i}" in admitted
    assert "b0" not in admitted and s.waiting[0].request_id == "b0"
