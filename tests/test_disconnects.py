"""A storm of clients that hang up mid-request: afterwards the engine, KV blocks and adapter slots are idle again."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from hardening_server import KEY_A, KEY_ADMIN, auth, secure_server, shared_cache

__all__ = ["shared_cache"]
MODELS = [None, "demo-q-r4", "demo-all-r8", "demo-mlp-r16"]


@pytest.fixture(scope="module")
def srv(shared_cache, tmp_path_factory):
    with secure_server(shared_cache, tmp_path_factory.mktemp("storm") / "adapters", max_loras=2) as s:
        yield s


def _idle(rt, adm) -> dict:
    sched, svc = rt.engine.scheduler, rt.adapters
    return {"running": len(sched.running), "waiting": len(sched.waiting), "engine_requests": len(rt.engine.requests),
            "open_streams": rt.async_engine.num_open(), "free_blocks": rt.engine.blocks.num_free,
            "slot_refs": svc.table.held(), "admitted": adm.in_flight, "held_versions": svc.store.held()}


def test_disconnect_storm_returns_everything(srv):
    rt, adm = srv.runtime, srv.app.state.admission
    idle = _idle(rt, adm)
    assert idle["free_blocks"] == rt.engine.blocks.num_blocks and idle["slot_refs"] == {}
    rng = random.Random(7)
    seen = {"streamed": 0, "before_first_token": 0, "non_streaming": 0}

    async def streaming(c: httpx.AsyncClient, i: int):
        body = {"model": MODELS[i % 4], "prompt": [256] + [rng.randrange(1, 250) for _ in range(rng.randint(1, 60))],
                "max_tokens": 2000, "ignore_eos": True, "stream": True}
        async with c.stream("POST", srv.base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            if i % 5 == 0:  # hang up as soon as the headers are in, before any token
                seen["before_first_token"] += 1
                return
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"text":"' in line and rng.random() < 0.5:
                    seen["streamed"] += 1
                    return  # leaving the block closes the connection mid-stream

    async def non_streaming(c: httpx.AsyncClient, i: int):
        body = {"model": MODELS[i % 4], "prompt": "hello " * 5, "max_tokens": 2000, "ignore_eos": True}
        task = asyncio.create_task(c.post(srv.base + "/v1/completions", json=body))
        await asyncio.sleep(0.2 + 0.3 * rng.random())
        task.cancel()  # the client gives up: its connection closes
        seen["non_streaming"] += 1
        await asyncio.gather(task, return_exceptions=True)

    async def storm():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=auth(KEY_A)) as c:
            jobs = [streaming(c, i) for i in range(200)] + [non_streaming(c, i) for i in range(20)]
            await asyncio.gather(*jobs)

    asyncio.run(storm())
    assert seen["streamed"] > 50 and seen["before_first_token"] == 40 and seen["non_streaming"] == 20
    deadline = time.monotonic() + 60
    while _idle(rt, adm) != idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _idle(rt, adm) == idle  # nothing leaked: no request, block, slot reference or admission left
    rt.engine.blocks.check_consistent()
    assert rt.adapters.table.idle()
    m = httpx.get(srv.base + "/metrics", headers=auth(KEY_ADMIN)).text
    assert "vllm:num_requests_running{model_name=" in m and 'finished_reason="abort"' in m
    r = httpx.post(srv.base + "/v1/completions", json={"prompt": "ok", "max_tokens": 3}, headers=auth(KEY_A))
    assert r.status_code == 200  # and the server still serves
