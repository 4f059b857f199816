"""The API passes each request's tenant to the engine; adapter latency histograms and flags reach /metrics and serve."""
from __future__ import annotations

import httpx
import pytest

from hardening_server import KEY_A, KEY_ADMIN, KEY_B, auth, secure_server, shared_cache

__all__ = ["shared_cache"]


@pytest.fixture(scope="module")
def srv(shared_cache, tmp_path_factory):
    with secure_server(shared_cache, tmp_path_factory.mktemp("many-api") / "adapters", max_loras=2,
                       max_cpu_loras=2, max_adapter_wait_steps=5, max_cpu_lora_bytes=1 << 30) as s:
        yield s


def test_tenant_reaches_the_engine_and_metrics_have_adapter_histograms(srv):
    rt, seen = srv.runtime, []
    real = rt.engine.add_request

    def add_request(rid, prompt, params, adapter_id=None, tenant=None):
        seen.append((adapter_id, tenant))
        return real(rid, prompt, params, adapter_id, tenant)

    rt.engine.add_request = add_request
    try:
        for key, model in ((KEY_A, "demo-q-r4"), (KEY_B, "demo-all-r8"), (KEY_B, rt.model_name)):
            body = {"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0}
            r = httpx.post(srv.base + "/v1/completions", json=body, headers=auth(key), timeout=60)
            assert r.status_code == 200, r.text
    finally:
        rt.engine.add_request = real
    assert [t for _, t in seen] == ["acme", "beta", "beta"] and seen[0][0].startswith("demo-q-r4@")
    assert rt.engine.scheduler.config.max_adapter_wait_steps == 5 and rt.adapters.cache.max_bytes == 1 << 30
    text = httpx.get(srv.base + "/metrics", headers=auth(KEY_ADMIN)).text
    for line in ('loramux_adapter_load_latency_seconds_bucket{le="+Inf",tier="gpu"}',
                 'loramux_adapter_load_latency_seconds_count{tier="disk"}', "loramux_adapter_wait_seconds_count",
                 'loramux_adapter_prefetch_hits_total{tier="gpu"}', 'loramux_adapter_prefetches_total{tier="disk"}',
                 "loramux_adapter_slots_loading", "loramux_adapter_prefetch_wasted_total"):
        assert line in text, line
    phases = {ln.split('"')[1]: float(ln.split()[-1]) for ln in text.splitlines()
              if ln.startswith("loramux_adapter_disk_load_phase_seconds_total{")}
    # first loads read the folders and write their packed files (save); none of these adapters was loaded twice
    assert set(phases) == {"read", "decode", "alloc", "pack", "check", "save"} and phases["pack"] > 0, phases
    assert "loramux_adapter_packed_writes_total" in text and "loramux_adapter_packed_bytes" in text
    count = [ln for ln in text.splitlines() if ln.startswith("loramux_adapter_wait_seconds_count")]
    assert float(count[0].split()[-1]) >= 2  # two adapter requests admitted


def test_serve_flags_parse():
    from loramux.server.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--max-adapter-wait-steps", "7", "--max-cpu-lora-bytes", "1000"])
    cfg = config_from_args(args)
    assert cfg.max_adapter_wait_steps == 7 and cfg.max_cpu_lora_bytes == 1000
    assert config_from_args(build_parser().parse_args(["serve"])).max_adapter_wait_steps == 32
