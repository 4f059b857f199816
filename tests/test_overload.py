"""Backpressure: a global bound on admitted work (503 + Retry-After), per-tenant token buckets (429 + Retry-After)."""
from __future__ import annotations

import asyncio
import gc
import threading
import time

import httpx
import pytest

from hardening_server import (KEY_A, KEY_ADMIN, KEY_B, KEYS, adapter_files, assert_error_shape, auth, secure_server,
                              shared_cache)
from loramux.server.api.admission import Admission, TokenBucket

__all__ = ["shared_cache"]


def test_token_bucket_and_tickets(monkeypatch):
    import loramux.server.api.admission as adm_mod

    now = [100.0]
    monkeypatch.setattr(adm_mod.time, "monotonic", lambda: now[0])
    b = TokenBucket(rate=2.0, capacity=4.0)
    assert b.wait_s(4) == 0 and b.wait_s(10) == 0  # a cost above capacity passes once the bucket is full
    b.take(10)
    assert b.wait_s(1) == pytest.approx(3.5)  # 6 in debt: 7 units at 2/s
    now[0] += 3.5
    assert b.wait_s(1) == 0
    a = Admission(max_in_flight=3, requests_per_s=1.0, tokens_per_s=100.0, burst_s=2.0,
                  tenant_limits={"vip": {"requests_per_s": 0}})
    t1 = a.admit("t", 2, 150)
    with pytest.raises(Exception) as ei:
        a.admit("u", 2, 1)  # 2 + 2 > 3: server full, whoever asks
    assert ei.value.status == 503 and ei.value.headers["Retry-After"] == "1" and a.rejected["full"] == 1
    t1.add_tokens(40)
    t1.release()
    t1.release()  # idempotent
    assert a.in_flight == 0 and a._bucket("t", "tokens_per_s").level == pytest.approx(200 - 40)  # estimate settled
    a.admit("t", 1, 10).release()
    with pytest.raises(Exception) as ei:
        a.admit("t", 1, 10)  # 2 requests of burst used up
    assert ei.value.status == 429 and ei.value.headers["Retry-After"] == "1" and "1 requests/s" in str(ei.value)
    tickets = [a.admit("u", 1, 10), a.admit("vip", 1, 10), a.admit("vip", 1, 10)]  # other tenants unaffected
    assert a.in_flight == 3 == a.peak
    del tickets
    gc.collect()  # tickets dropped without release() are released by their finalizer
    assert a.in_flight == 0


@pytest.fixture(scope="module")
def srv(shared_cache, tmp_path_factory):
    keys = dict(KEYS, tenants={"acme": {"requests_per_s": 1.0}, "beta": {"tokens_per_s": 40.0}})
    with secure_server(shared_cache, tmp_path_factory.mktemp("overload") / "adapters", keys=keys, max_num_seqs=2,
                       max_queued_requests=4, rate_limit_burst_s=2.0) as s:
        yield s


def _body(max_tokens=24, **kw):
    return {"prompt": [256, 72, 105], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def test_global_bound_is_503_and_admitted_requests_complete(srv):
    rt, adm = srv.runtime, srv.app.state.admission
    go, real_step = threading.Event(), rt.engine.step

    def paused_step():  # nothing finishes until every request has been answered or admitted
        assert go.wait(60)
        return real_step()

    async def fire(n: int):
        async with httpx.AsyncClient(timeout=60, headers=auth(KEY_ADMIN)) as c:
            tasks = [asyncio.create_task(c.post(srv.base + "/v1/completions", json=_body(model="demo-q-r4" if i % 2
                                                                                         else None)))
                     for i in range(n)]
            while adm.in_flight + adm.rejected["full"] < n:
                await asyncio.sleep(0.01)
            rejected_early = adm.rejected["full"]
            go.set()
            return rejected_early, await asyncio.gather(*tasks)

    rt.engine.step = paused_step
    try:
        rejected_early, replies = asyncio.run(fire(30))
    finally:
        rt.engine.step = real_step
        go.set()
    ok = [r for r in replies if r.status_code == 200]
    full = [r for r in replies if r.status_code == 503]
    assert len(ok) == 6 and len(full) == 24 == rejected_early, [r.status_code for r in replies]
    for r in full:
        assert r.headers["retry-after"] == "1" and assert_error_shape(r)["code"] == "server_overloaded"
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in ok)
    assert adm.peak <= 6 and adm.in_flight == 0  # the work held in memory never exceeded the bound
    assert httpx.post(srv.base + "/v1/completions", json=_body(), headers=auth(KEY_ADMIN)).status_code == 200
    m = httpx.get(srv.base + "/metrics", headers=auth(KEY_ADMIN)).text
    assert 'loramux_requests_rejected_total{reason="full"} 24.0' in m and "loramux_admission_bound 6.0" in m
    info = httpx.get(srv.base + "/info", headers=auth(KEY_A)).json()
    assert info["tenancy"] == "api-keys" and info["limits"]["max_queued_requests"] == 4


def test_tenant_rate_limits_are_429_and_spare_the_others(srv):
    base = srv.base
    codes = [httpx.post(base + "/v1/completions", json=_body(4), headers=auth(KEY_A)) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]  # acme: 1 request/s, a bucket of 2
    err = assert_error_shape(codes[2])
    assert err["type"] == "rate_limit_error" and "acme" in err["message"] and int(codes[2].headers["retry-after"]) >= 1
    assert httpx.post(base + "/v1/completions", json=_body(4), headers=auth(KEY_ADMIN)).status_code == 200
    # beta: 40 tokens/s, a bucket of 80; a request is charged prompt + max_tokens before it is tokenized
    assert httpx.post(base + "/v1/completions", json=_body(60), headers=auth(KEY_B)).status_code == 200
    r = httpx.post(base + "/v1/completions", json=_body(60), headers=auth(KEY_B))
    assert r.status_code == 429 and "tokens/s" in assert_error_shape(r)["message"]
    assert int(r.headers["retry-after"]) >= 1
    # uploads count as requests too, and refused requests were never charged
    assert srv.app.state.admission.in_flight == 0


def test_concurrent_uploads_are_bounded(srv):
    base, adm = srv.base, srv.app.state.admission
    files = adapter_files(srv.runtime, seed=9)
    go = threading.Event()
    results: list = []

    def slow(i: int):
        req = httpx.Request("POST", base, data={"id": f"slow-{i}"}, files=files)
        body, ctype = req.read(), req.headers["content-type"]

        def parts():  # half now, the rest once the third upload has been answered
            yield body[: len(body) // 2]
            go.wait(30)
            yield body[len(body) // 2:]

        results.append(httpx.post(base + "/v1/adapters", content=parts(), timeout=60,
                                  headers={"content-type": ctype, **auth(KEY_ADMIN)}).status_code)

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    try:
        deadline = time.monotonic() + 30
        while adm.uploads < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(base + "/v1/adapters", data={"id": "third"}, files=adapter_files(srv.runtime, seed=10),
                       headers=auth(KEY_ADMIN))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "uploads" in assert_error_shape(r)["message"]
    finally:
        go.set()
        [t.join(30) for t in threads]
    assert results == [201, 201] and adm.uploads == 0
