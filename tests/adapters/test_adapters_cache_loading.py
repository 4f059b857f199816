"""CpuAdapterCache LRU by count and bytes; AdapterLoader loads off-thread and caches errors briefly."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from loramux.adapters import loading as loading_mod
from loramux.adapters.cache import CpuAdapterCache
from loramux.adapters.config import parse_lora_config
from loramux.adapters.errors import AdapterError
from loramux.adapters.loader import LoadedAdapter
from loramux.adapters.loading import AdapterLoader
from loramux.adapters.registry import AdapterRegistry

CFG = parse_lora_config({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})


def fake(nbytes: int) -> LoadedAdapter:
    a = torch.zeros(nbytes // 4)
    return LoadedAdapter(None, CFG, {(0, "q_proj"): (a[None], a[:, None])}, {(0, "q_proj"): 1.0}, 1, nbytes)


def test_lru_by_count():
    c = CpuAdapterCache(max_adapters=2)
    c.put("a", fake(8))
    c.put("b", fake(8))
    assert c.get("a") is not None  # a becomes most recent
    c.put("c", fake(8))
    assert "b" not in c and "a" in c and "c" in c and c.ids() == ["a", "c"]
    s = c.stats()
    assert s["adapters"] == 2 and s["evictions"] == 1 and s["hits"] == 1 and s["bytes"] == 16
    assert c.get("b") is None and c.stats()["misses"] == 1


def test_lru_by_bytes_and_oversized():
    c = CpuAdapterCache(max_adapters=10, max_bytes=100)
    for name in "abc":
        assert c.put(name, fake(40))
    assert c.ids() == ["b", "c"] and c.stats()["bytes"] == 80
    assert not c.put("huge", fake(104)) and "huge" not in c and c.ids() == ["b", "c"]
    assert c.put("b", fake(60))  # replacing re-counts bytes: 60 + 40 = 100 fits
    assert c.ids() == ["c", "b"] and c.stats()["bytes"] == 100
    assert c.pop("c").nbytes == 40 and c.pop("c") is None and c.stats()["bytes"] == 60 and len(c) == 1


def test_cache_thread_safety():
    c = CpuAdapterCache(max_adapters=3, max_bytes=1000)

    def worker(k: int):
        for i in range(200):
            c.put(f"{k}-{i % 7}", fake(40))
            c.get(f"{(k + 1) % 4}-{i % 7}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    s = c.stats()
    assert s["adapters"] == len(c.ids()) <= 3 and s["bytes"] == 40 * s["adapters"]


def test_registry_refuses_dora_even_without_spec(tmp_path, valid_dir):
    (valid_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["q_proj"], '
                                                   '"use_dora": true}')
    with pytest.raises(AdapterError, match="DoRA"):
        AdapterRegistry(tmp_path / "reg").add_dir("x", valid_dir)


@pytest.fixture
def reg(tmp_path, valid_dir, llama_spec):
    r = AdapterRegistry(tmp_path / "reg")
    r.add_dir("good", valid_dir)
    r.add_dir("bad-rank", valid_dir)  # valid on disk, refused by a server whose max rank is lower
    return r


def test_loads_off_thread(reg, llama_spec, monkeypatch):
    gate, seen = threading.Event(), []
    real = loading_mod.load_adapter

    def slow_load(*a, **k):
        seen.append(threading.current_thread().name)
        assert gate.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(loading_mod, "load_adapter", slow_load)
    cache = CpuAdapterCache(4)
    ld = AdapterLoader(reg, llama_spec, torch.float16, cache)
    try:
        assert ld.poll("good") is None  # starts the load and returns at once
        ld.request("good")  # idempotent: still one load in flight
        assert ld.poll("good") is None and ld.loading() == ["good"]
        gate.set()
        ad = ld.get_blocking("good", timeout=30)
        assert ad.adapter_id == "good" and ad.weights[(0, "q_proj")][0].dtype == torch.float16
        assert seen == [seen[0]] and seen[0].startswith("adapter-load")
        assert "good" in cache and ld.poll("good") is ad and ld.loading() == []
    finally:
        ld.close()


def test_errors_reported_and_cached_briefly(reg, llama_spec, monkeypatch):
    import dataclasses
    calls = []
    real = loading_mod.load_adapter
    monkeypatch.setattr(loading_mod, "load_adapter", lambda *a, **k: (calls.append(a[0].name), real(*a, **k))[1])
    spec = dataclasses.replace(llama_spec, max_lora_rank=2)
    ld = AdapterLoader(reg, spec, torch.float32, CpuAdapterCache(4), error_ttl_s=60)
    try:
        with pytest.raises(AdapterError, match="max LoRA rank"):
            ld.get_blocking("bad-rank", timeout=30)
        err = ld.poll("bad-rank")
        assert isinstance(err, AdapterError) and err.status == 400
        ld.request("bad-rank")
        assert ld.poll("bad-rank") is err and calls == ["bad-rank"]  # not re-read while cached
        ld.invalidate("bad-rank")
        with pytest.raises(AdapterError):
            ld.get_blocking("bad-rank", timeout=30)
        assert calls == ["bad-rank", "bad-rank"]
        with pytest.raises(AdapterError) as ei:
            ld.get_blocking("missing", timeout=30)
        assert ei.value.status == 404
    finally:
        ld.close()


def test_error_ttl_expires(reg, llama_spec):
    import dataclasses
    ld = AdapterLoader(reg, dataclasses.replace(llama_spec, max_lora_rank=2), torch.float32, CpuAdapterCache(4),
                       error_ttl_s=0.05)
    try:
        with pytest.raises(AdapterError):
            ld.get_blocking("bad-rank", timeout=30)
        time.sleep(0.1)
        assert ld.poll("bad-rank") is None  # expired: a fresh load started
    finally:
        ld.close()
