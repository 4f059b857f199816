"""/metrics (parsed with prometheus_client; counters move), /info, /health, /ready and /v1/models on the live server."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def _scrape(base: str) -> dict:
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _value(fams, name, **labels) -> float:
    return sum(s.value for s in fams[name].samples
               if s.name == name + ("_total" if fams[name].type == "counter" else "")
               and all(s.labels.get(k) == v for k, v in labels.items()))


def _count(fams, name) -> float:
    return sum(s.value for s in fams[name].samples if s.name == name + "_count")


def test_metric_names_are_vllm_compatible(demo_server):
    fams = _scrape(demo_server[0])
    for name, kind in [("vllm:num_requests_running", "gauge"), ("vllm:num_requests_waiting", "gauge"),
                       ("vllm:kv_cache_usage_perc", "gauge"), ("vllm:lora_requests_info", "gauge"),
                       ("vllm:prompt_tokens", "counter"), ("vllm:generation_tokens", "counter"),
                       ("vllm:request_success", "counter"), ("vllm:time_to_first_token_seconds", "histogram"),
                       ("vllm:inter_token_latency_seconds", "histogram"),
                       ("vllm:e2e_request_latency_seconds", "histogram"),
                       ("loramux_adapter_slots_total", "gauge"), ("loramux_adapter_slots_in_use", "gauge"),
                       ("loramux_adapter_loads", "counter"), ("loramux_adapter_evictions", "counter"),
                       ("loramux_adapter_hits", "counter")]:
        assert name in fams and fams[name].type == kind, name
    info = fams["vllm:lora_requests_info"].samples[0]
    assert set(info.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert info.labels["max_lora"] == str(demo_server[1].config.max_loras) and info.value > 1e9
    assert 0.0 <= fams["vllm:kv_cache_usage_perc"].samples[0].value <= 1.0


def test_counters_move_after_requests(demo_server, client):
    base, rt = demo_server
    before = _scrape(base)
    r = client.completions.create(model=rt.model_name, prompt="count me", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    a = client.completions.create(model="demo-q-r4", prompt="adapter", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = _scrape(base)
    prompt = r.usage.prompt_tokens + a.usage.prompt_tokens
    assert _value(after, "vllm:prompt_tokens") - _value(before, "vllm:prompt_tokens") == prompt
    assert _value(after, "vllm:generation_tokens") - _value(before, "vllm:generation_tokens") == 8
    length = dict(finished_reason="length")
    assert _value(after, "vllm:request_success", **length) - _value(before, "vllm:request_success", **length) == 2
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert _count(after, hist) - _count(before, hist) == 2
    assert _count(after, "vllm:inter_token_latency_seconds") - _count(before, "vllm:inter_token_latency_seconds") == 6
    per = "loramux_adapter_generation_tokens"
    assert _value(after, per, adapter="demo-q-r4") - _value(before, per, adapter="demo-q-r4") == 3
    assert _value(after, per, adapter=rt.model_name) - _value(before, per, adapter=rt.model_name) == 5
    assert _value(after, "loramux_adapter_requests", adapter="demo-q-r4") >= 1


def test_health_ready_info(demo_server):
    base, rt = demo_server
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").json()["status"] == "ready"
    info = httpx.get(base + "/info").json()
    assert info["model"] == rt.model_name and info["max_model_len"] == rt.max_model_len
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["version"]
    assert info["max_loras"] == rt.config.max_loras and info["max_lora_rank"] == rt.config.max_lora_rank
    mc = info["model_config"]
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_hidden_layers", "vocab_size"):
        assert isinstance(mc[key], int) and mc[key] > 0, key
    assert mc["vocab_size"] == rt.vocab_size


def test_models_list_and_retrieve(demo_server, client):
    base, rt = demo_server
    data = client.models.list().data
    assert data[0].id == rt.model_name and data[0].owned_by == "loramux"
    adapters = {m.id for m in data[1:]}
    assert {"demo-q-r4", "demo-all-r8", "demo-mlp-r16"} <= adapters
    assert all(m.parent == rt.model_name for m in data[1:])
    assert client.models.retrieve("demo-q-r4").parent == rt.model_name
    raw = httpx.get(base + "/v1/models").text
    assert str(rt.config.cache_dir) not in raw and "/" not in "".join(m.root or "" for m in data)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_request(demo_server, stream):
    import time

    base, rt = demo_server
    aborted = _value(_scrape(base), "vllm:request_success", finished_reason="abort")
    body = {"model": rt.model_name, "prompt": "long", "max_tokens": 3000, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # generation has begun; leaving the block closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 5  # the whole generation would take far longer than this
    while time.monotonic() < deadline:
        fams = _scrape(base)
        if fams["vllm:num_requests_running"].samples[0].value == 0 and \
                _value(fams, "vllm:request_success", finished_reason="abort") == aborted + 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the engine kept generating for a client that hung up")
