"""/v1/completions through the official openai client (sync, async, streaming) and raw SSE, on the live demo server."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai


def _greedy(client, model, prompt, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=kw.pop("max_tokens", 8),
                                     temperature=0, **kw)


def test_string_prompt_shape(client, model):
    r = _greedy(client, model, "Hello")
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model
    assert r.created > 0 and len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason in ("stop", "length") and isinstance(c.text, str)
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_is_deterministic(client, model):
    assert _greedy(client, model, "abc").choices[0].text == _greedy(client, model, "abc").choices[0].text


def test_prompt_forms_agree(client, model, demo_server):
    rt = demo_server[1]
    ids_a, ids_b = rt.tokenizer.encode("one"), rt.tokenizer.encode("two words")
    text_a = _greedy(client, model, "one").choices[0].text
    text_b = _greedy(client, model, "two words").choices[0].text
    listed = _greedy(client, model, ["one", "two words"])
    assert [c.index for c in listed.choices] == [0, 1]
    assert [c.text for c in listed.choices] == [text_a, text_b]
    assert _greedy(client, model, ids_a).choices[0].text == text_a
    by_ids = _greedy(client, model, [ids_a, ids_b])
    assert [c.text for c in by_ids.choices] == [text_a, text_b]
    assert by_ids.usage.prompt_tokens == len(ids_a) + len(ids_b)


def test_n_choices_and_seed_reproducibility(client, model):
    kw = dict(model=model, prompt="seeded", max_tokens=12, temperature=1.0, n=2, seed=1234)
    first, second = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    other = client.completions.create(**dict(kw, seed=99))
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    # n choices of one prompt count the prompt once
    single = client.completions.create(**dict(kw, n=1))
    assert first.usage.prompt_tokens == single.usage.prompt_tokens


def test_echo_prepends_prompt(client, model):
    plain = _greedy(client, model, "echo me").choices[0].text
    echoed = _greedy(client, model, "echo me", echo=True).choices[0].text
    assert echoed == "echo me" + plain


def test_logprobs_shape(client, model):
    r = _greedy(client, model, "logprobs", logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_stop_string(client, model):
    full = _greedy(client, model, "stop here", max_tokens=16).choices[0].text
    stop = next(ch for ch in full[2:] if ch.isalnum())
    r = _greedy(client, model, "stop here", max_tokens=16, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert stop not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_extensions_via_extra_body(client, model):
    r = _greedy(client, model, "ext", max_tokens=6, extra_body={"ignore_eos": True, "top_k": 1,
                                                                 "repetition_penalty": 1.1})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_streaming_matches_and_include_usage(client, model):
    full = _greedy(client, model, "stream", max_tokens=10)
    chunks = list(client.completions.create(model=model, prompt="stream", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert "".join(c.choices[0].text for c in chunks[:-1]) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason


def test_streaming_n_interleaves_choices(client, model):
    chunks = list(client.completions.create(model=model, prompt=["a", "b"], max_tokens=4, temperature=0, n=2,
                                            stream=True))
    assert {c.choices[0].index for c in chunks} == {0, 1, 2, 3}
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 4


def test_raw_sse_framing(demo_server):
    base, rt = demo_server
    body = {"model": rt.model_name, "prompt": "raw", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"].startswith("cmpl-")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    payloads = [json.loads(e[6:]) for e in events[:-2]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] <= 3
    assert {p["id"] for p in payloads} == {r.headers["x-request-id"]}


def test_async_client(demo_server):
    base, rt = demo_server

    async def go():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0) as ac:
            rs = await asyncio.gather(*[ac.completions.create(model=rt.model_name, prompt=f"p{i}", max_tokens=4,
                                                              temperature=0) for i in range(4)])
            stream = await ac.completions.create(model=rt.model_name, prompt="p0", max_tokens=4, temperature=0,
                                                 stream=True)
            text = "".join([c.choices[0].text async for c in stream])
            return rs, text

    rs, text = asyncio.run(go())
    assert len({r.id for r in rs}) == 4 and text == rs[0].choices[0].text


def test_request_id_header(demo_server):
    base, rt = demo_server
    body = {"model": rt.model_name, "prompt": "id", "max_tokens": 1}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.headers["x-request-id"] == r.json()["id"]
    r = httpx.post(base + "/v1/completions", json=body, headers={"X-Request-Id": "my-trace-1"}, timeout=60)
    assert r.headers["x-request-id"] == "my-trace-1"
    assert httpx.get(base + "/health").headers["x-request-id"]
    bad = httpx.get(base + "/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert bad.headers["x-request-id"] != "bad id\twith spaces"
