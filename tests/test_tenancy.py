"""Tenant isolation matrix (list/get/use/delete across two tenants and an admin), versions on PUT, restart."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from hardening_server import (KEY_A, KEY_ADMIN, KEY_B, adapter_files, assert_error_shape, auth, secure_server,
                              shared_cache, upload)

__all__ = ["shared_cache"]
PROMPT = [256, 72, 101, 108, 108, 111]


@pytest.fixture(scope="module")
def srv(shared_cache, tmp_path_factory):
    with secure_server(shared_cache, tmp_path_factory.mktemp("tenancy") / "adapters") as s:
        yield s


def _ids(base, key, route="/v1/adapters"):
    r = httpx.get(base + route, headers=auth(key))
    assert r.status_code == 200, r.text
    return {a["id"] for a in r.json()["data"]}


def _complete(base, key, model, **kw):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, **kw}
    return httpx.post(base + "/v1/completions", json=body, headers=auth(key), timeout=60)


def test_isolation_matrix(srv):
    base, rt = srv.base, srv.runtime
    fa, fb = adapter_files(rt, seed=1), adapter_files(rt, seed=2)
    for key, aid, files in [(KEY_A, "a-only", fa), (KEY_A, "same", fa), (KEY_B, "b-only", fb), (KEY_B, "same", fb)]:
        r = upload(base, key, aid, files)
        assert r.status_code == 201, r.text
        assert r.json()["id"] == aid and r.json()["tenant"] in ("acme", "beta")
    public = {"demo-q-r4", "demo-all-r8", "demo-mlp-r16"}
    # list: own + public; an admin sees everyone's, other tenants' as tenant/id
    assert _ids(base, KEY_A) == public | {"a-only", "same"}
    assert _ids(base, KEY_B) == public | {"b-only", "same"}
    assert _ids(base, KEY_ADMIN) == public | {"acme/a-only", "acme/same", "beta/b-only", "beta/same"}
    assert _ids(base, KEY_A, "/v1/models") == public | {"a-only", "same", rt.model_name}
    # get / use another tenant's adapter: 404 (never 403), by plain or qualified name
    for name in ("b-only", "beta/b-only", "beta/same", "nope"):
        err = assert_error_shape(httpx.get(f"{base}/v1/adapters/{name}", headers=auth(KEY_A)), 404)
        assert err["type"] == "not_found_error"
        assert_error_shape(_complete(base, KEY_A, name), 404)
        assert_error_shape(httpx.get(f"{base}/v1/models/{name}", headers=auth(KEY_A)), 404)
    assert httpx.get(f"{base}/v1/adapters/acme/a-only", headers=auth(KEY_A)).status_code == 200  # own, qualified
    assert httpx.get(f"{base}/v1/adapters/beta/b-only", headers=auth(KEY_ADMIN)).json()["tenant"] == "beta"
    # the same id in two namespaces is two adapters; an admin reaches each by tenant/id
    out_a, out_b = (_complete(base, k, "same").json()["choices"][0]["text"] for k in (KEY_A, KEY_B))
    assert out_a != out_b
    assert _complete(base, KEY_ADMIN, "acme/same").json()["choices"][0]["text"] == out_a
    assert _complete(base, KEY_ADMIN, "beta/same").json()["choices"][0]["text"] == out_b
    assert _complete(base, KEY_A, "demo-q-r4").status_code == 200  # public adapters serve every tenant
    # no conflict that leaks another tenant's ids; public and own ids do conflict
    assert upload(base, KEY_A, "b-only", fa).status_code == 201  # now acme has its own b-only
    assert_error_shape(upload(base, KEY_A, "a-only", fa), 409)
    assert_error_shape(upload(base, KEY_A, "demo-q-r4", fa), 409)
    assert_error_shape(upload(base, KEY_A, "beta/x", fa), 400)  # no writing into another namespace
    # delete: own only; a public adapter needs an admin; another tenant's is 404
    assert_error_shape(httpx.delete(f"{base}/v1/adapters/beta/b-only", headers=auth(KEY_A)), 404)
    assert_error_shape(httpx.delete(f"{base}/v1/adapters/demo-q-r4", headers=auth(KEY_A)), 403)
    assert httpx.delete(f"{base}/v1/adapters/b-only", headers=auth(KEY_A)).status_code == 200  # acme's own
    assert "b-only" in _ids(base, KEY_B)
    assert httpx.delete(f"{base}/v1/adapters/beta/b-only", headers=auth(KEY_ADMIN)).status_code == 200
    assert "b-only" not in _ids(base, KEY_B)
    assert_error_shape(_complete(base, KEY_B, "b-only"), 404)
    # what is left on disk is namespaced per tenant
    root = srv.config.resolved_adapter_dir
    assert sorted(p.name for p in (root / "_tenants").iterdir()) == ["acme", "beta"]
    assert not (root / "a-only").exists() and (root / "_tenants" / "acme" / "a-only").is_dir()


def test_every_route_needs_a_key_but_probes(srv):
    base = srv.base
    for path in ("/health", "/ready"):
        assert httpx.get(base + path).status_code == 200
    paths = srv.app.openapi()["paths"]  # every documented route, plus the undocumented ones below
    routes = [(m.upper(), p.replace("{model_id}", "x").replace("{adapter_id}", "x")) for p, ops in paths.items()
              for m in ops if p not in ("/health", "/ready")]
    routes += [("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs")]
    assert ("POST", "/v1/completions") in routes and ("GET", "/metrics") in routes and len(routes) >= 12
    for method, path in routes + [("GET", "/no-such-route")]:
        for headers in ({}, auth("sk-wrong-key-0123456789"), {"Authorization": "Basic abc"}):
            r = httpx.request(method, base + path, headers=headers)
            err = assert_error_shape(r, 401)
            assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert_error_shape(httpx.get(base + "/metrics", headers=auth(KEY_A)), 403)
    assert httpx.get(base + "/metrics", headers=auth(KEY_ADMIN)).status_code == 200
    assert httpx.get(base + "/openapi.json", headers=auth(KEY_B)).status_code == 200


def test_put_makes_a_new_version_while_in_flight_requests_keep_the_old(srv):
    base, rt = srv.base, srv.runtime
    assert upload(base, KEY_A, "ver", adapter_files(rt, seed=11)).status_code == 201
    reg = rt.adapters.store.registry("acme")
    kw = {"max_tokens": 160}
    old_text = _complete(base, KEY_A, "ver", **kw).json()["choices"][0]["text"]
    got, started = [], threading.Event()

    def stream():
        body = {"model": "ver", "prompt": PROMPT, "temperature": 0, "ignore_eos": True, "stream": True, **kw}
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=auth(KEY_A), timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    got.append(json.loads(line[6:])["choices"][0]["text"])
                    started.set()

    go, real_step = threading.Event(), rt.engine.step

    def paused_step():  # the engine thread waits here until the replace is done: no race with the stream
        assert go.wait(60)
        return real_step()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(30)
    rt.engine.step = paused_step
    try:
        r = upload(base, KEY_A, "ver", adapter_files(rt, seed=12), method="PUT")
        assert r.status_code == 200 and r.json()["version"] == 2, r.text
        assert t.is_alive() and reg.versions("ver") == [1, 2]  # v1 stays on disk while the stream holds it
        assert httpx.get(base + "/v1/adapters/ver", headers=auth(KEY_A)).json()["version"] == 2
    finally:
        rt.engine.step = real_step
        go.set()
    t.join(60)
    assert "".join(got) == old_text  # the running request finished on version 1
    new_text = _complete(base, KEY_A, "ver", **kw).json()["choices"][0]["text"]
    assert new_text != old_text  # new requests get version 2, never the stale weights
    assert reg.versions("ver") == [2]  # ... and is gone once nobody holds it
    assert not [k for k in rt.adapters.table.resident() if k.startswith("acme/ver@1")]
    assert rt.adapters.store.held() == {}
    assert upload(base, KEY_A, "fresh", adapter_files(rt, seed=3), method="PUT").status_code == 201


def test_restart_keeps_uploads(shared_cache, tmp_path):
    adapters = tmp_path / "adapters"
    with secure_server(shared_cache, adapters) as s:
        files = adapter_files(s.runtime, seed=5)
        assert upload(s.base, KEY_B, "keep-me", files).status_code == 201
        assert upload(s.base, KEY_B, "keep-me", adapter_files(s.runtime, seed=6), method="PUT").status_code == 200
        before = _complete(s.base, KEY_B, "keep-me").json()["choices"][0]["text"]
    with secure_server(shared_cache, adapters) as s:
        card = httpx.get(s.base + "/v1/adapters/keep-me", headers=auth(KEY_B)).json()
        assert card["tenant"] == "beta" and card["version"] == 2
        assert _complete(s.base, KEY_B, "keep-me").json()["choices"][0]["text"] == before
        assert_error_shape(httpx.get(s.base + "/v1/adapters/keep-me", headers=auth(KEY_A)), 404)


def test_delete_then_reupload_never_serves_the_old_weights(srv):
    base, rt = srv.base, srv.runtime
    assert upload(base, KEY_B, "reuse", adapter_files(rt, seed=21)).status_code == 201
    first = _complete(base, KEY_B, "reuse").json()["choices"][0]["text"]
    assert httpx.delete(base + "/v1/adapters/reuse", headers=auth(KEY_B)).status_code == 200
    r = upload(base, KEY_B, "reuse", adapter_files(rt, seed=22))
    assert r.status_code == 201 and r.json()["version"] == 2  # a fresh number: no cache knows it yet
    assert _complete(base, KEY_B, "reuse").json()["choices"][0]["text"] != first
