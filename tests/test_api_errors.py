"""Every user mistake is a 4xx in OpenAI's error shape (never a 500); failures after streaming began are SSE events."""
from __future__ import annotations

import httpx
import openai
import pytest


def _shape(body: dict) -> dict:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("kw, param", [
    ({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"), ({"echo": True, "logprobs": 1}, "echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"stop": ["x"] * 17}, "stop"),
    ({"prompt": ["a"] * 9, "n": 16}, "n"), ({"seed": 2**64}, "seed"),
])
def test_bad_completion_params_raise_bad_request(client, model, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": model, "prompt": "x", **kw})
    assert e.value.status_code == 400 and e.value.body["param"].startswith(param)
    assert e.value.body["type"] == "invalid_request_error"


def test_bad_prompts(client, model, demo_server):
    vocab = demo_server[1].vocab_size
    for prompt, text in [([], "must not be empty"), ([[]], "must not be empty"), ([vocab + 5], "outside the vocab")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=prompt, max_tokens=1)
        assert text in e.value.body["message"]


def test_context_length_errors_carry_numbers(client, model, demo_server):
    limit = demo_server[1].max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=[1] * (limit - 10), max_tokens=50)
    msg = e.value.body["message"]
    assert str(limit) in msg and str(limit - 10) in msg and "50" in msg
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=[1] * (limit + 1), max_tokens=1)
    assert str(limit + 1) in e.value.body["message"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model" and "no-such-adapter" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")


@pytest.mark.parametrize("content, ctype", [
    (b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b'"just a string"', "application/json"),
    (b"", "application/json"), (b'{"prompt": 5}', "application/json"), (b'{"model": "m"}', "application/json"),
    (b"prompt=x", "application/x-www-form-urlencoded"),
])
def test_malformed_bodies_are_400(demo_server, content, ctype):
    base, _ = demo_server
    for route in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(base + route, content=content, headers={"content-type": ctype}, timeout=30)
        assert r.status_code == 400, (route, content, r.text)
        _shape(r.json())


def test_bad_json_message(demo_server):
    r = httpx.post(demo_server[0] + "/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert "not valid JSON" in r.json()["error"]["message"]


def test_unknown_route_and_method(demo_server):
    base, _ = demo_server
    r = httpx.get(base + "/v1/nothing-here")
    assert r.status_code == 404 and _shape(r.json())["type"] == "not_found_error"
    r = httpx.get(base + "/v1/completions")
    assert r.status_code == 405 and _shape(r.json())


def test_unknown_fields_are_ignored_and_logged(client, model, caplog):
    with caplog.at_level("WARNING", logger="loramux.api"):
        r = client.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"frobnicate": 3})
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                       extra_body={"zorble": 1})
    assert r.choices[0].text is not None
    assert "frobnicate" in caplog.text and "zorble" in caplog.text


def test_streaming_errors_before_start_are_plain_http_errors(demo_server):
    base, _ = demo_server
    body = {"model": "missing", "prompt": "x", "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 404
        assert _shape(r.read() and r.json())["param"] == "model"
