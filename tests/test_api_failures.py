"""Failure paths on a fake runtime (no model): mid-stream errors, engine death, no adapter service, label bounds."""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from loramux.server.api.app import create_app
from loramux.server.api.errors import APIError
from loramux.server.api.metrics import OTHER, Metrics
from loramux.server.engine.async_engine import StreamDelta


class FakeTokenizer:
    chat_template = "x"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 50 + 1 for c in text] or [1]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def token_text(self, i):
        return chr(97 + i % 26)

    def render_chat(self, messages, add_generation_prompt=True, template=None):
        return "chat"


class FakeEngine:
    def __init__(self, script):
        self.script, self.dead = script, None

    def start(self, loop):
        pass

    def shutdown(self):
        pass

    async def generate(self, rid, ids, params, adapter_id, tenant=None):
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield item


def fake_runtime(script, adapters=None):
    def resolve(name, request=None):
        if name in (None, "fake"):
            return None
        raise APIError(404, f"the model {name!r} does not exist", "model")

    return SimpleNamespace(
        model_name="fake", created=1, max_model_len=64, vocab_size=50, tokenizer=FakeTokenizer(),
        async_engine=FakeEngine(script), adapters=adapters, resolve_model=resolve, ready=False,
        engine=SimpleNamespace(scheduler=SimpleNamespace(running=[], waiting=deque()),
                               blocks=SimpleNamespace(usage=0.25)),
        config=SimpleNamespace(max_loras=2, max_lora_rank=16, max_cpu_loras=4, max_num_seqs=8,
                               max_num_batched_tokens=64, block_size=16),
        model_dir=Path("/nonexistent"))


def _sse(client, route, body):
    with client.stream("POST", route, json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        return [e[6:] for e in r.read().decode().split("\n\n") if e]


OK = StreamDelta("ab", [1, 2], prompt_tokens=3, completion_tokens=2)
ERR = StreamDelta("", [], finish_reason="abort", prompt_tokens=3, error="adapter x could not be loaded")
ROUTES = [("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})]


@pytest.mark.parametrize("route, body", ROUTES)
def test_error_after_stream_began_is_sse_event_then_done(route, body):
    with TestClient(create_app(fake_runtime([OK, ERR]))) as client:
        events = _sse(client, route, body)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "could not be loaded" in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert any("ab" in e for e in events[:-2])


@pytest.mark.parametrize("route, body", ROUTES)
def test_exception_inside_stream_becomes_sse_error(route, body):
    with TestClient(create_app(fake_runtime([OK, RuntimeError("boom")]))) as client:
        events = _sse(client, route, body)
    assert events[-1] == "[DONE]" and "boom" in json.loads(events[-2])["error"]["message"]


@pytest.mark.parametrize("route, body", ROUTES)
def test_error_without_stream_is_http_error(route, body):
    with TestClient(create_app(fake_runtime([ERR]))) as client:
        r = client.post(route, json=body)
    assert r.status_code == 400 and "could not be loaded" in r.json()["error"]["message"]


def test_dead_engine_gives_503():
    rt = fake_runtime([OK])
    with TestClient(create_app(rt)) as client:
        assert client.get("/ready").status_code == 200
        rt.async_engine.dead = RuntimeError("gone")
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        r = client.post(ROUTES[0][0], json=ROUTES[0][1])
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"


def test_ready_is_503_before_startup():
    rt = fake_runtime([OK])
    client = TestClient(create_app(rt))  # no context manager: lifespan has not run
    assert client.get("/ready").status_code == 503


def test_without_adapter_service():
    with TestClient(create_app(fake_runtime([OK]))) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["fake"]
        r = client.get("/v1/adapters")
        assert r.status_code == 503 and r.json()["error"]["message"]


def test_adapter_labels_are_bounded():
    m = Metrics(fake_runtime([]), max_adapter_labels=2)
    assert m.adapter_label(None) == "fake"
    assert [m.adapter_label(a) for a in ("a", "b", "c", "d", "a", "b")] == ["a", "b", OTHER, OTHER, "a", "b"]


def test_metrics_on_fake_runtime_count_outcomes():
    from prometheus_client.parser import text_string_to_metric_families

    last = StreamDelta("", [], finish_reason="length", prompt_tokens=3, completion_tokens=2)
    with TestClient(create_app(fake_runtime([OK, last]))) as client:
        client.post(ROUTES[0][0], json=ROUTES[0][1])
        text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    success = {s.labels["finished_reason"]: s.value for s in fams["vllm:request_success"].samples}
    assert success == {"length": 1.0}
    assert fams["vllm:kv_cache_usage_perc"].samples[0].value == 0.25
