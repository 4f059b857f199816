"""/v1/chat/completions through the openai client: shapes, streaming deltas, logprobs, templates (base and adapter)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from loramux.adapters.demo import write_random_adapter

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def _chat(client, model, **kw):
    kw.setdefault("max_completion_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=kw.pop("messages", MSGS), **kw)


def test_chat_shape_and_usage(client, model, demo_server):
    rt = demo_server[1]
    r = _chat(client, model)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length") and c.logprobs is None
    rendered = rt.tokenizer.render_chat(MSGS)
    assert r.usage.prompt_tokens == len(rt.tokenizer.encode(rendered, add_special_tokens=False))
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_and_max_completion_tokens(client, model):
    extra = {"ignore_eos": True}
    assert _chat(client, model, max_completion_tokens=3, extra_body=extra).usage.completion_tokens == 3
    r = client.chat.completions.create(model=model, messages=MSGS, max_tokens=4, temperature=0, extra_body=extra)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    both = _chat(client, model, max_tokens=9, max_completion_tokens=2, extra_body=extra)
    assert both.usage.completion_tokens == 2  # max_completion_tokens wins, as in OpenAI and vLLM


def test_text_content_parts_equal_string(client, model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    a = _chat(client, model, messages=parts)
    b = _chat(client, model, messages=[{"role": "user", "content": "hi"}])
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs_chat_shape(client, model):
    r = _chat(client, model, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        assert 1 <= len(t.top_logprobs) <= 3 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    no_top = _chat(client, model, logprobs=True)
    assert all(t.top_logprobs == [] for t in no_top.choices[0].logprobs.content)


def test_stream_role_first_then_content_finish_usage(client, model):
    full = _chat(client, model, max_completion_tokens=10)
    chunks = list(_chat(client, model, max_completion_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_logprobs_and_n(client, model):
    chunks = list(_chat(client, model, n=2, stream=True, logprobs=True, top_logprobs=1, seed=5, temperature=0.9))
    assert {c.choices[0].index for c in chunks} == {0, 1}
    assert sum(1 for c in chunks if c.choices[0].delta.role == "assistant") == 2
    assert any(c.choices[0].logprobs and c.choices[0].logprobs.content for c in chunks)


def test_raw_chat_sse_ends_with_done(demo_server):
    base, rt = demo_server
    body = {"model": rt.model_name, "messages": MSGS, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert r.headers["x-request-id"].startswith("chatcmpl-")


def test_model_without_template_is_400(client, model, demo_server):
    tok = demo_server[1].tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, model)
    finally:
        tok.chat_template = saved
    assert e.value.status_code == 400 and "no chat template" in e.value.body["message"]
    assert e.value.body["param"] == "messages"


def test_template_failure_and_bad_roles_are_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:  # the demo template raises on roles it does not know
        _chat(client, model, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert "Unsupported role" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        _chat(client, model, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        _chat(client, model, messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert "only text parts" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, model, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


def test_adapter_ships_its_own_chat_template(client, demo_server, tmp_path):
    base, rt = demo_server
    cfg = json.loads((rt.model_dir / "config.json").read_text())
    folder = write_random_adapter(tmp_path / "a", cfg, r=4, alpha=8.0, targets=["q_proj"], seed=3)
    template = "{{ bos_token }}ADAPTER{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    files = {"adapter_config.json": (folder / "adapter_config.json").read_bytes(),
             "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes(),
             "tokenizer_config.json": json.dumps({"chat_template": template}).encode()}
    up = httpx.post(base + "/v1/adapters", data={"id": "chat-tpl-adapter"}, files=files, timeout=60)
    assert up.status_code == 201, up.text
    try:
        r = _chat(client, "chat-tpl-adapter", max_completion_tokens=2)
        want = rt.tokenizer.render_chat(MSGS, template=template)
        assert want.endswith("ADAPTER[be brief][hi]")
        assert r.model == "chat-tpl-adapter"
        assert r.usage.prompt_tokens == len(rt.tokenizer.encode(want, add_special_tokens=False))
    finally:
        httpx.delete(base + "/v1/adapters/chat-tpl-adapter", timeout=60)
