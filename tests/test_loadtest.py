"""End-to-end tests of loadtest/ against a fake OpenAI-compatible server with known delays and tokens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from loramux.loadtest.cli import main

TTFT, ITL = 0.05, 0.02  # the fake server's delay before the first token and between tokens (s)
BASE = "fake-base"
MODEL_CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_hidden_layers": 3}


class Fake:
    """Server state the tests inspect: every request body seen, uploads, in-flight high-water mark."""

    def __init__(self):
        self.requests, self.uploads = [], []
        self.inflight = self.max_inflight = 0
        self.info = {"model_id": BASE, "model_config": MODEL_CONFIG}

    def reset(self):
        self.__init__()


def make_app(fake: Fake):
    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": BASE, "object": "model"}, {"id": "x", "object": "model"}]}

    @app.get("/info")
    async def info():
        return fake.info

    @app.post("/v1/adapters")
    async def upload(request: fastapi.Request):
        form = await request.form()
        entry = {"fields": {k: v for k, v in form.items() if isinstance(v, str)}, "files": {}}
        for k, v in form.items():
            if not isinstance(v, str):
                entry["files"][k] = (v.filename, await v.read())
        fake.uploads.append(entry)
        return JSONResponse({"id": entry["fields"].get("id")}, status_code=201)

    async def generate(request: fastapi.Request, chat: bool):
        body = await request.json()
        body["_auth"] = request.headers.get("authorization")
        fake.requests.append(body)
        model, n = body["model"], body["max_tokens"]
        if model in ("err429", "err500"):
            code = int(model[3:])
            return JSONResponse({"error": {"message": "nope", "type": "x", "param": None, "code": code}}, code)
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                 "total_tokens": len(prompt.split()) + n}
        if not body.get("stream"):
            await asyncio.sleep(TTFT)
            return {"id": "cmpl-1", "object": "text_completion", "model": model,
                    "choices": [{"index": 0, "text": "w " * n, "finish_reason": "length"}], "usage": usage}

        def chunk(text, finish=None):
            c = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            obj = {"id": "c", "model": model, "choices": [dict(c, finish_reason=finish)]}
            return "data: " + json.dumps(obj) + "\n\n"

        async def events():
            fake.inflight += 1
            fake.max_inflight = max(fake.max_inflight, fake.inflight)
            try:
                if chat:  # a role-only chunk at once: must not count as the first token
                    yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) + "\n\n"
                await asyncio.sleep(TTFT)
                for i in range(n):
                    if i:
                        await asyncio.sleep(ITL)
                    if model == "midstream" and i == 2:
                        yield 'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n'
                        return
                    if model == "truncated" and i == 2:
                        return  # the connection closes without [DONE]
                    yield chunk(f" t{i}", "length" if i == n - 1 else None)
                if (body.get("stream_options") or {}).get("include_usage") and model != "nousage":
                    yield "data: " + json.dumps({"id": "c", "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                fake.inflight -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await generate(request, False)

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        return await generate(request, True)

    return app


@pytest.fixture(scope="module")
def server():
    fake = Fake()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(make_app(fake), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if srv.started:
            break
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=5)


def run_tool(url, tmp_path, *extra):
    out = tmp_path / "out"
    code = main(["run", "--base-url", url, "--out", str(out), "--no-progress", *extra])
    return code, json.loads((out / "results.json").read_text())


def test_streaming_metrics_match_the_server(server, tmp_path):
    fake, url = server
    fake.reset()
    code, doc = run_tool(url, tmp_path, "--num-requests", "12", "--input-len", "20", "--output-len", "6",
                         "--adapter-count", "4", "--adapter-prefix", "ad", "--adapter-dist", "zipf:1.0",
                         "--ignore-eos", "--api-key", "sekret", "--goodput", "ttft:5000", "e2el:60000")
    assert code == 0
    s, reqs = doc["summary"], doc["requests"]
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["total_output_tokens"] == 72 and s["total_input_tokens"] == 240
    assert s["goodput"]["good_requests"] == 12
    for r in reqs:
        assert r["success"] and r["usage_reported"] and r["output_tokens"] == 6 and r["prompt_tokens"] == 20
        assert TTFT * 0.9 <= r["ttft"] < TTFT + 2.0
        assert len(r["itl"]) == 5  # one gap per text chunk after the first
        assert r["e2el"] >= TTFT + 5 * ITL * 0.9
    assert ITL * 0.5 <= s["itl"]["median"] / 1000 < ITL + 1.0
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert s[m]["p50"] <= s[m]["p90"] <= s[m]["p99"] <= s[m]["max"]
    for body in fake.requests:
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 6
        assert body["_auth"] == "Bearer sekret" and body["model"] in {"ad0", "ad1", "ad2", "ad3"}
        assert len(body["prompt"].split()) == 20
    assert "sekret" not in json.dumps(doc)  # the key is never written out
    assert doc["config"]["base_model"] == BASE and doc["per_adapter"][0]["requests"] >= 3
    if _has_matplotlib():
        import matplotlib.image as mpimg

        for name in ("latency_cdf.png", "throughput_over_time.png", "per_adapter_latency.png"):
            assert mpimg.imread(tmp_path / "out" / name).shape[0] > 100


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_chat_without_usage_counts_chunks(server, tmp_path):
    fake, url = server
    fake.reset()
    code, doc = run_tool(url, tmp_path, "--endpoint", "chat", "--num-requests", "4", "--output-len", "5",
                         "--adapters", "nousage", "--input-len", "7")
    assert code == 0
    for r in doc["requests"]:
        assert r["success"] and not r["usage_reported"]
        assert r["output_tokens"] == 5 and r["prompt_tokens"] == 7  # chunks counted; prompt as planned
        assert r["ttft"] >= TTFT * 0.9  # the role-only chunk did not count
    assert all(len(b["messages"][0]["content"].split()) == 7 for b in fake.requests)


def test_non_streaming_uses_usage(server, tmp_path):
    fake, url = server
    code, doc = run_tool(url, tmp_path, "--no-stream", "--num-requests", "3", "--output-len", "4")
    assert code == 0
    for r in doc["requests"]:
        assert r["success"] and r["output_tokens"] == 4 and r["ttft"] == r["e2el"] and r["itl"] == []
        assert r["model"] == BASE


def test_errors_are_counted_by_status(server, tmp_path, capsys):
    fake, url = server
    code, doc = run_tool(url, tmp_path, "--num-requests", "30", "--output-len", "4",
                         "--adapters", "err429,err500,midstream,truncated,fine")
    s = doc["summary"]
    names = ("err429", "err500", "midstream", "truncated", "fine")
    planned = {m: sum(r["model"] == m for r in doc["requests"]) for m in names}
    assert code == 0 and s["completed"] == planned["fine"] > 0
    assert s["failed_by_status"] == {"429": planned["err429"], "500": planned["err500"],
                                     "stream_error": planned["midstream"],
                                     "incomplete_stream": planned["truncated"]}
    assert "status 429:" in capsys.readouterr().out
    # nothing listening: every request fails with the connection error's name, and the tool exits 1
    with socket.socket() as s2:
        s2.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s2.getsockname()[1]}"
    code, doc = run_tool(dead, tmp_path, "--base-model", "m", "--num-requests", "3")
    assert code == 1 and doc["summary"]["failed_by_status"] == {"ConnectError": 3}


def test_adapter_mix_base_fraction_and_concurrency(server, tmp_path):
    fake, url = server
    fake.reset()
    code, doc = run_tool(url, tmp_path, "--num-requests", "40", "--output-len", "3", "--adapters", "a,b",
                         "--adapter-dist", "single", "--base-fraction", "0.5", "--request-rate", "400",
                         "--max-concurrency", "3", "--seed", "7")
    assert code == 0
    seen = [b["model"] for b in fake.requests]
    assert set(seen) == {"a", BASE} and 8 <= seen.count(BASE) <= 32
    assert fake.max_inflight <= 3
    assert doc["summary"]["base_requests"] == seen.count(BASE)


def test_make_adapters_writes_safetensors_and_uploads(server, tmp_path):
    fake, url = server
    fake.reset()
    out = tmp_path / "ad"
    code = main(["make-adapters", "--base-url", url, "--count", "3", "--ranks", "4,8",
                 "--targets", "q_proj,v_proj,down_proj", "--prefix", "lt-", "--out-dir", str(out)])
    assert code == 0 and [u["fields"] for u in fake.uploads] == [{"id": f"lt-{i}"} for i in range(3)]
    from safetensors.numpy import load_file

    h, layers = MODEL_CONFIG["hidden_size"], MODEL_CONFIG["num_hidden_layers"]
    for i, up in enumerate(fake.uploads):
        r = (4, 8)[i % 2]
        assert set(up["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
        folder = out / f"lt-{i}"
        for name, (filename, data) in up["files"].items():
            assert filename == name and data == (folder / name).read_bytes()
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == r and cfg["base_model_name_or_path"] == BASE
        assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
        t = load_file(str(folder / "adapter_model.safetensors"))
        assert len(t) == 3 * 2 * layers
        pre = "base_model.model.model.layers.2."
        assert t[pre + "self_attn.q_proj.lora_A.weight"].shape == (r, h)
        assert t[pre + "self_attn.q_proj.lora_B.weight"].shape == (h, r)
        assert t[pre + "self_attn.v_proj.lora_B.weight"].shape == (2 * 16, r)  # kv heads * head_dim
        assert t[pre + "mlp.down_proj.lora_A.weight"].shape == (r, 96)
        assert str(t[pre + "mlp.down_proj.lora_B.weight"].dtype) == "float16"


def test_make_adapters_explains_a_bad_info(server, tmp_path):
    fake, url = server
    fake.reset()
    fake.info = {"model_id": BASE, "max_model_len": 128}
    with pytest.raises(SystemExit, match="model_config"):
        main(["make-adapters", "--base-url", url, "--out-dir", str(tmp_path), "--no-upload"])
    assert fake.uploads == []


def test_module_entry_and_ctrl_c_keeps_results(server, tmp_path):
    fake, url = server
    fake.reset()
    out = tmp_path / "int"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "run", "--base-url", url, "--num-requests", "200",
         "--request-rate", "20", "--output-len", "40", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while len(fake.requests) < 5 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    doc = json.loads((out / "results.json").read_text())
    s = doc["summary"]
    assert s["interrupted"] and s["not_sent"] > 0 and s["cancelled"] + s["completed"] + s["not_sent"] == 200
    assert "Serving Benchmark Result" in stdout and "Traceback" not in stderr
