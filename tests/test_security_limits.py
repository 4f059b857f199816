"""Every bound is a clear 4xx in OpenAI's shape; nothing from user data executes (auto_map, templates, pickle)."""
from __future__ import annotations

import json
import pickle
import socket
import sys

import httpx
import pytest

from hardening_server import adapter_files, assert_error_shape, secure_server, shared_cache

__all__ = ["shared_cache"]
LIMITS = dict(max_n=4, max_logprobs=5, max_stop=3, max_stop_length=10, max_body_bytes=64 << 10,
              max_header_bytes=8 << 10, max_adapter_bytes=400_000)


@pytest.fixture(scope="module")
def srv(shared_cache, tmp_path_factory):
    with secure_server(shared_cache, tmp_path_factory.mktemp("limits") / "adapters", keys=None, **LIMITS) as s:
        yield s


def _post(base, route, **body):
    return httpx.post(base + route, json=body, timeout=60)


COMPLETION = {"prompt": "hi", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("route, body, param, text", [
    ("/v1/completions", dict(COMPLETION, n=5), "n", "at most 4"),
    ("/v1/chat/completions", dict(CHAT, n=5), "n", "at most 4"),
    ("/v1/completions", dict(COMPLETION, logprobs=6), "logprobs", "at most 5"),
    ("/v1/chat/completions", dict(CHAT, logprobs=True, top_logprobs=6), "top_logprobs", "at most 5"),
    ("/v1/completions", dict(COMPLETION, stop=["a", "b", "c", "d"]), "stop", "at most 3"),
    ("/v1/chat/completions", dict(CHAT, stop="x" * 11), "stop", "the limit is 10"),
    ("/v1/completions", dict(COMPLETION, stop_token_ids=[1, 2, 3, 4]), "stop_token_ids", "at most 3"),
    ("/v1/completions", dict(COMPLETION, prompt=["a"] * 40, n=4), "n", "at most 128"),
    ("/v1/completions", dict(COMPLETION, max_tokens=10**9), "max_tokens", "maximum context length"),
    ("/v1/completions", dict(COMPLETION, n=10**6), "n", ""),
])
def test_request_bounds_are_400(srv, route, body, param, text):
    err = assert_error_shape(_post(srv.base, route, **body), 400)
    assert err["param"] == param and text in err["message"], err


def test_within_bounds_still_works(srv):
    r = _post(srv.base, "/v1/completions", **dict(COMPLETION, n=4, logprobs=5, stop=["a", "b", "c"]))
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_body_size_is_413(srv):
    big = {"prompt": "x" * (70 << 10), "max_tokens": 1}
    err = assert_error_shape(httpx.post(srv.base + "/v1/completions", json=big), 413)
    assert str(64 << 10) in err["message"]
    data = json.dumps(big).encode()

    def chunks():  # no Content-Length: counted while it streams in
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    r = httpx.post(srv.base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert str(64 << 10) in assert_error_shape(r, 413)["message"]


def test_header_size_is_431(srv):
    r = httpx.get(srv.base + "/v1/models", headers={"x-pad": "a" * (10 << 10)})
    assert "8192" in assert_error_shape(r, 431)["message"]
    r = httpx.get(srv.base + "/v1/models", headers={f"x-h{i}": "a" * 40 for i in range(300)})  # many small ones
    assert_error_shape(r, 431)
    # far over (more than one read): h11 stops buffering at the limit; uvicorn's parser answers, still as JSON
    r = httpx.get(srv.base + "/v1/models", headers={"x-pad": "a" * (256 << 10)})
    assert "8192" in assert_error_shape(r, 431)["message"]
    with socket.create_connection(("127.0.0.1", int(srv.base.rsplit(":", 1)[1]))) as s:  # garbage is a JSON 400
        s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after its answer
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 400") and '"error"' in reply
    assert httpx.get(srv.base + "/v1/models").status_code == 200  # and the server is fine


def test_upload_size_is_413(srv):
    files = adapter_files(srv.runtime, seed=1, r=16)
    files["adapter_config.json"] = files["adapter_config.json"]
    big = adapter_files(srv.runtime, seed=2, r=64)
    r = httpx.post(srv.base + "/v1/adapters", data={"id": "too-big"}, files=big)
    assert "400000" in assert_error_shape(r, 413)["message"]
    assert httpx.get(srv.base + "/v1/adapters/too-big").status_code == 404
    root = srv.config.resolved_adapter_dir
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the staging folder is gone


def _with_files(srv, aid, **extra):
    files = adapter_files(srv.runtime, seed=3)
    for name, value in extra.items():
        files[name.replace("__", ".")] = value
    return httpx.post(srv.base + "/v1/adapters", data={"id": aid}, files=files)


def test_auto_map_and_remote_code_never_run(srv, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "loramux_evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = json.loads(adapter_files(srv.runtime)["adapter_config.json"])
    cfg.update(auto_map={"AutoModel": "loramux_evil_mod.Model", "AutoTokenizer": "loramux_evil_mod.Model"},
               trust_remote_code=True)
    tok = {"auto_map": {"AutoTokenizer": ["loramux_evil_mod.Model", None]}, "tokenizer_class": "loramux_evil_mod"}
    r = _with_files(srv, "automap", adapter_config__json=json.dumps(cfg).encode(),
                    tokenizer_config__json=json.dumps(tok).encode())
    assert r.status_code in (201, 400, 422), r.text
    if r.status_code == 201:  # accepted as data: using it must not import anything
        for route, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            assert _post(srv.base, route, model="automap", **body).status_code in (200, 400)
    r = _with_files(srv, "withcode", modeling_evil__py=b"import os; os.system('touch x')")
    assert "unexpected file" in assert_error_shape(r, 400)["message"]
    assert not marker.exists() and "loramux_evil_mod" not in sys.modules


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_are_never_loaded(srv, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(str(marker)))
    r = _with_files(srv, "pickled", adapter_model__safetensors=payload)
    assert r.status_code in (400, 413) and assert_error_shape(r)["param"] == "adapter_model.safetensors"
    r = _with_files(srv, "pickled2", adapter_model__bin=payload)
    assert "unexpected file" in assert_error_shape(r, 400)["message"]
    assert not marker.exists()


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{% set x = namespace() %}{% set x.__class__ = 1 %}",
    "{{ messages.append(1) }}{{ messages.pop() }}",
])
def test_chat_templates_run_sandboxed(srv, template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    aid = f"tpl-{abs(hash(template)) % 10**8}"
    r = _with_files(srv, aid, tokenizer_config__json=json.dumps({"chat_template": template}).encode())
    assert r.status_code == 201, r.text
    err = assert_error_shape(_post(srv.base, "/v1/chat/completions", model=aid, **CHAT), 400)
    assert err["code"] == "chat_template_error"
    assert not (tmp_path / "MARKER").exists()
    assert _post(srv.base, "/v1/completions", model=aid, **COMPLETION).status_code == 200
