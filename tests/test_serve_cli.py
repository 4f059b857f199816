"""`loramux serve` as a real process on the embedded default answers a completion and a streamed completion; the
mixed-step graph flag and the LoRA path switches default on."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from live_server import free_port


def test_loramux_serve_process(tmp_path):
    port = free_port()
    env = dict(os.environ, LORAMUX_CACHE_DIR=str(tmp_path))  # flags also come from LORAMUX_* variables
    proc = subprocess.Popen([sys.executable, "-m", "loramux.server.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] == 5 or body["choices"][0]["finish_reason"] == "stop"
        events = []
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"prompt": "Hi", "max_tokens": 4, "stream": True, "temperature": 0}) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        streamed = "".join(c["choices"][0]["text"] for c in chunks)
        full = httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0},
                          timeout=30).json()["choices"][0]["text"]
        assert streamed == full
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("server did not exit on SIGTERM")


@pytest.mark.parametrize("env, argv, want", [(None, [], True), ("0", [], False), ("off", [], False), ("1", [], True),
                                             ("0", ["--mixed-step-graphs"], True),
                                             (None, ["--no-mixed-step-graphs"], False)])
def test_mixed_step_graphs_default_flag_and_env(monkeypatch, env, argv, want):
    """On by default; LORAMUX_MIXED_STEP_GRAPHS=0 or --no-mixed-step-graphs turns it off, the flag wins."""
    from loramux.server.cli import build_parser

    if env is None:
        monkeypatch.delenv("LORAMUX_MIXED_STEP_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("LORAMUX_MIXED_STEP_GRAPHS", env)
    assert build_parser().parse_args(["serve", *argv]).mixed_step_graphs is want


@pytest.mark.parametrize("env, want", [(None, True), ("1", True), ("0", False)])
def test_lora_path_switches_default_on(monkeypatch, env, want):
    from loramux.kernels.lora import _switch

    if env is None:
        monkeypatch.delenv("LORAMUX_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("LORAMUX_TEST_SWITCH", env)
    assert _switch("LORAMUX_TEST_SWITCH") is want


@pytest.mark.parametrize("name, value, message", [
    ("LORAMUX_FUSED_SAMPLING", "ture", "LORAMUX_FUSED_SAMPLING='ture'; expected 1/on, 0/off or auto"),
    ("LORAMUX_LORA_PREFILL_EXPAND_BM", "48", "LORAMUX_LORA_PREFILL_EXPAND_BM='48'; expected 16, 32 or 64")])
def test_switch_typo_is_a_clear_startup_error(tmp_path, name, value, message):
    """A mistyped switch stops `loramux serve` before the model loads: exit 2, one line naming it."""
    env = dict(os.environ, HOME=str(tmp_path), **{name: value})
    p = subprocess.run([sys.executable, "-m", "loramux.server.cli", "serve", "--port", str(free_port())], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    assert "Traceback" not in p.stderr
