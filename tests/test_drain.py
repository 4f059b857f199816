"""`loramux serve` as a process: SIGTERM drains under load and exits 0; SIGKILL mid-upload restarts clean."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from hardening_server import adapter_files, shared_cache, wait_ready
from live_server import free_port

__all__ = ["shared_cache"]


@contextmanager
def serve_process(cache: Path, adapters: Path, *flags: str):
    port = free_port()
    env = dict(os.environ, LORAMUX_CACHE_DIR=str(cache), LORAMUX_ADAPTER_DIR=str(adapters))
    proc = subprocess.Popen([sys.executable, "-m", "loramux.server.cli", "serve", "--port", str(port), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 90, proc)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _stream(base: str, max_tokens: int, out: dict, key: str) -> None:
    body = {"prompt": [256, 72, 105], "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                out.setdefault(key + ":started", True)
    out[key] = events


def test_sigterm_drains_running_requests_then_exits_0(shared_cache, tmp_path):
    with serve_process(shared_cache, tmp_path / "adapters", "--drain-timeout", "3") as (proc, base):
        out: dict = {}
        jobs = {f"short{i}": 40 for i in range(3)} | {f"long{i}": 4000 for i in range(3)}
        threads = [threading.Thread(target=_stream, args=(base, n, out, k)) for k, n in jobs.items()]
        long_plain: dict = {}

        def plain():  # a non-streaming request that cannot finish within the drain timeout
            body = {"prompt": "x", "max_tokens": 4000, "ignore_eos": True}
            long_plain["r"] = httpx.post(base + "/v1/completions", json=body, timeout=60)

        threads.append(threading.Thread(target=plain))
        [t.start() for t in threads]
        deadline = time.monotonic() + 30
        while sum(k.endswith(":started") for k in out) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while httpx.get(base + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() - t0 < 2, "/ready did not turn 503"
            time.sleep(0.02)
        r = httpx.post(base + "/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "server_draining"
        assert proc.wait(20) == 0, proc.stdout.read()
        elapsed = time.monotonic() - t0
        [t.join(10) for t in threads]
    assert 2.5 < elapsed < 15, elapsed
    for key in jobs:
        events = out[key]
        assert events[-1] == "[DONE]", (key, events[-3:])
        reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert reasons[-1] == ("length" if key.startswith("short") else "abort"), (key, reasons[-1])
    r = long_plain["r"]
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort"
    assert 0 < r.json()["usage"]["completion_tokens"] < 4000


def test_sigint_with_zero_drain_timeout_aborts_at_once(shared_cache, tmp_path):
    with serve_process(shared_cache, tmp_path / "adapters", "--drain-timeout", "0") as (proc, base):
        out: dict = {}
        t = threading.Thread(target=_stream, args=(base, 4000, out, "long"))
        t.start()
        deadline = time.monotonic() + 30
        while "long:started" not in out and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 8
        t.join(10)
    assert json.loads(out["long"][-2])["choices"][0]["finish_reason"] == "abort"


def _multipart(files: dict, adapter_id: str) -> tuple[bytes, str]:
    req = httpx.Request("POST", "http://x", data={"id": adapter_id}, files=files)
    return req.read(), req.headers["content-type"]


def test_sigkill_during_upload_restarts_clean(shared_cache, tmp_path):
    adapters = tmp_path / "adapters"
    with serve_process(shared_cache, adapters) as (proc, base):
        files = adapter_files(SimpleRuntime(shared_cache), seed=4)
        assert httpx.post(base + "/v1/adapters", data={"id": "keep"}, files=files, timeout=60).status_code == 201
        before = httpx.post(base + "/v1/completions", json={"model": "keep", "prompt": "a", "max_tokens": 5,
                                                             "temperature": 0}).json()["choices"][0]["text"]
        body, ctype = _multipart(files, "half")
        stop = threading.Event()

        def slow_body():  # most of the upload, then the client stalls (the server is killed meanwhile)
            yield body[: len(body) - 100]
            stop.wait(30)

        t = threading.Thread(target=lambda: _quiet_post(base, slow_body(), ctype))
        t.start()
        deadline = time.monotonic() + 30
        while not _staged(adapters) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _staged(adapters), "the upload never reached the staging folder"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stop.set()
        t.join(10)
    assert _staged(adapters)  # the kill left a half upload behind ...
    with serve_process(shared_cache, adapters) as (proc, base):
        ids = [a["id"] for a in httpx.get(base + "/v1/adapters").json()["data"]]
        assert "keep" in ids and "half" not in ids
        assert not _staged(adapters)  # ... which the restart removed
        again = httpx.post(base + "/v1/completions", json={"model": "keep", "prompt": "a", "max_tokens": 5,
                                                            "temperature": 0}).json()["choices"][0]["text"]
        assert again == before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def _staged(root: Path) -> list[Path]:
    """Staging folders that an upload has started writing into."""
    return [p for p in root.iterdir() if p.name.startswith(".tmp-") and (p / "adapter_model.safetensors").exists()] \
        if root.is_dir() else []


def _quiet_post(base, content, ctype) -> None:
    try:
        httpx.post(base + "/v1/adapters", content=content, headers={"content-type": ctype}, timeout=60)
    except httpx.HTTPError:
        pass  # the server was killed under it


class SimpleRuntime:
    """Just enough of a Runtime for adapter_files(): where the demo model's config.json is."""

    def __init__(self, cache: Path):
        self.model_dir = next(p.parent for p in Path(cache).rglob("config.json") if "adapter" not in str(p))
