"""`--model random:SHAPE`: random weights of a named shape served with the embedded tokenizer, every token text."""
from __future__ import annotations

import json

import httpx

from live_server import live_server


def test_random_shape_serves_text_tokens(tmp_path):
    with live_server(tmp_path, model="random:tiny") as (base, runtime):
        assert runtime.model_name == "random-tiny" and runtime.model_config.vocab_size == 512
        r = httpx.post(base + "/v1/completions", json={"model": "random-tiny", "prompt": "hello", "max_tokens": 8,
                                                       "ignore_eos": True, "temperature": 1.0, "seed": 3}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        chunks = []
        with httpx.stream("POST", base + "/v1/completions", timeout=60,
                          json={"prompt": "hello", "max_tokens": 8, "ignore_eos": True, "stream": True,
                                "temperature": 1.0, "seed": 3}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        # ids beyond the 262-token byte vocabulary would decode to nothing; sampling stays inside it, so the
        # stream carries one content chunk per token (what load tests time TTFT and ITL by)
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) >= 6
