"""A request's adapter starts loading from disk when the request arrives (SlotGate.hint, called by the server before
it queues the request for the engine thread), not at the next schedule: with the load done by then, the first
step after the request is added already runs it. Hints never evict what waiting requests want."""
from __future__ import annotations

import asyncio
import time

import pytest

from adapters_world import peft_world
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.request import SamplingParams
from test_many_adapters import _assert_clean, _engine

PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return peft_world(tmp_path_factory.mktemp("hint"), "llama", seed=5)


def _setup(world, tmp_path, max_cpu: int = 4):
    base, adapters = world
    ids = {f"ad{i}": path for i, path in enumerate(adapters.values())}
    engine, svc = _engine(base, tmp_path / "reg", ids, 2, max_cpu)
    return engine, svc, list(ids)


def _wait_loaded(svc, aid: str) -> None:
    deadline = time.monotonic() + 30
    while aid not in svc.cache:
        assert time.monotonic() < deadline, "the hinted load never finished"
        time.sleep(0.002)


def _drain(engine) -> None:
    deadline = time.monotonic() + 60
    while engine.has_work():
        assert time.monotonic() < deadline
        engine.step()
        if engine.last_step.num_requests == 0:
            time.sleep(0.001)


def test_hinted_request_runs_in_the_first_step_unhinted_one_waits(world, tmp_path):
    engine, svc, ids = _setup(world, tmp_path)
    assert svc.hint(ids[0]) and svc.arrival_loads == 1
    _wait_loaded(svc, ids[0])  # the load ran while no step was taken (as during the step in flight)
    engine.add_request("hinted", [5, 6, 7], PARAMS, ids[0])
    outs = engine.step()
    assert [o.request_id for o in outs if o.new_token_ids] == ["hinted"]
    engine.add_request("cold", [5, 6, 7], PARAMS, ids[1])  # on disk, no hint: the schedule starts its load
    outs = engine.step()
    assert "cold" not in [o.request_id for o in outs if o.new_token_ids]
    _drain(engine)
    _assert_clean(engine, svc)
    assert svc.stats()["arrival_loads_total"] == 1


def test_no_hint_for_adapters_already_here_or_under_a_deep_queue(world, tmp_path):
    engine, svc, ids = _setup(world, tmp_path, max_cpu=4)
    assert svc.hint(ids[0])
    _wait_loaded(svc, ids[0])
    assert not svc.hint(ids[0])  # in the CPU cache
    engine.add_request("r", [1, 2], PARAMS, ids[0])
    engine.step()
    assert svc.table.is_loaded(ids[0]) and not svc.hint(ids[0])  # in a slot
    svc._wanted = {"x", "y"}  # waiting requests want half the CPU cache (4): prefetch's window decides
    assert not svc.hint(ids[1]) and not svc.loader.in_flight(ids[1]) and ids[1] not in svc.cache
    svc._wanted = {"x"}
    assert svc.hint(ids[1])
    _wait_loaded(svc, ids[1])
    _drain(engine)
    _assert_clean(engine, svc)


def test_a_failing_hint_never_fails_the_request(world, tmp_path):
    engine, svc, ids = _setup(world, tmp_path)

    def broken(_aid):
        raise RuntimeError("boom")

    svc.hint = broken
    engine.hint_adapter(ids[0])  # logged, not raised
    engine.hint_adapter(None)


def test_server_hints_before_queueing_the_request(world, tmp_path):
    engine, svc, ids = _setup(world, tmp_path)
    seen = []
    real = engine.hint_adapter
    engine.hint_adapter = lambda aid: (seen.append((aid, engine.has_work())), real(aid))

    class _Tok:
        def decode(self, ids, **_):
            return "".join(chr(97 + i % 26) for i in ids)

    async def main():
        ae = AsyncEngine(engine, _Tok())
        ae.start(asyncio.get_running_loop())
        try:
            return [d async for d in ae.generate("g", [3, 4, 5], PARAMS, ids[2])]
        finally:
            ae.shutdown()

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 3
    assert seen == [(ids[2], False)]  # hinted before the engine thread saw the request
    assert svc.arrival_loads == 1
    _assert_clean(engine, svc)
