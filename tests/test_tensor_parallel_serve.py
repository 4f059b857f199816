"""`loramux serve --tensor-parallel-size 2` (CPU, gloo): same greedy output as TP=1, clean SIGTERM, worker crash."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from live_server import free_port, live_server, wait_ready

PROMPTS = ["Hello", "The quick brown fox", "1, 2, 3,"]
MODELS = [None, "demo-all-r8"]
DEVICE = os.environ.get("LORAMUX_TP_TEST_DEVICE", "cpu")  # "cuda": the same over NCCL, one GPU per rank


def _start(cache_dir, tp: int = 2):
    port = free_port()
    env = dict(os.environ, LORAMUX_CACHE_DIR=str(cache_dir))
    proc = subprocess.Popen([sys.executable, "-m", "loramux.server.cli", "serve", "--port", str(port),
                             "--tensor-parallel-size", str(tp), "--num-kv-blocks", "256", "--drain-timeout", "5",
                             "--device", DEVICE, "--dtype", "float32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 60, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, base


def _workers(proc) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]


def _complete(base, model, prompt):
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    if model is not None:
        body["model"] = model
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _finish(proc, timeout=30) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("server did not exit:\n" + out)
    return out


def test_tp2_serve_matches_tp1_and_stops_cleanly(tmp_path):
    with live_server(tmp_path / "tp1", num_kv_blocks=256, device=DEVICE, dtype="float32") as (base1, _):
        want = {(m, p): _complete(base1, m, p) for m in MODELS for p in PROMPTS}
    proc, base = _start(tmp_path / "tp2")
    try:
        workers = _workers(proc)
        assert len(workers) == 1
        got = {(m, p): _complete(base, m, p) for m in MODELS for p in PROMPTS}
        assert got == want
        assert got[("demo-all-r8", PROMPTS[0])] != got[(None, PROMPTS[0])]  # the adapter changed something
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        # SIGTERM while a request runs: it finishes (drain), then the workers are stopped
        slow = ThreadPoolExecutor(1).submit(httpx.post, base + "/v1/completions", timeout=60,
                                            json={"prompt": "x", "max_tokens": 200, "temperature": 0,
                                                  "ignore_eos": True})
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = _finish(proc)
    assert proc.returncode == 0, out
    r = slow.result(timeout=5)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    deadline = time.monotonic() + 10
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
        assert time.monotonic() < deadline, "a tensor-parallel worker outlived the server"
        time.sleep(0.1)


def test_tp2_serve_exits_nonzero_when_a_worker_dies(tmp_path):
    proc, base = _start(tmp_path)
    try:
        assert _complete(base, None, "Hi")
        (worker,) = _workers(proc)
        worker.kill()
        t0 = time.monotonic()
        saw_503 = False
        while proc.poll() is None and time.monotonic() - t0 < 30:
            try:  # 200 until the watchdog notices (<= 0.5 s), then 503 for about a second, then the process exits
                if httpx.get(base + "/health", timeout=1).status_code == 503:
                    saw_503 = True
                    assert httpx.get(base + "/ready", timeout=1).status_code == 503
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        out = _finish(proc, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None), out
    assert time.monotonic() - t0 < 30
    assert "tensor-parallel worker rank 1" in out and "Traceback" not in out, out
    assert saw_503


@pytest.mark.parametrize("size", [0])
def test_serve_rejects_bad_tensor_parallel_size(tmp_path, size):
    from loramux.server.cli import build_parser, config_from_args, serve

    args = build_parser().parse_args(["serve", "--tensor-parallel-size", str(size), "--cache-dir", str(tmp_path)])
    assert serve(config_from_args(args)) == 2
