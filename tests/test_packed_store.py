"""PackedStore (adapters/packed_store.py): a mapped packed file gives exactly the adapter a fresh load of the folder
gives; changed files, another model or dtype miss; the disk bound holds; damaged files fall back to the folder."""
from __future__ import annotations

import os
import shutil
import time
import pytest
import torch

from loramux.adapters.cache import CpuAdapterCache
from loramux.adapters.demo import write_random_adapter
from loramux.adapters.loader import load_adapter
from loramux.adapters.loading import AdapterLoader
from loramux.adapters.packed_store import SUFFIX, PackedStore
from loramux.adapters.spec import BaseModelSpec
from loramux.server.models.model_config import ModelConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapters_world import peft_world

    base, adapters = peft_world(tmp_path_factory.mktemp("pstore"))
    return ModelConfig.from_dir(base).raw, adapters, base


def _same(got, want):
    assert got.config == want.config and got.scales == want.scales
    assert (got.max_rank, got.nbytes, got.num_layers) == (want.max_rank, want.nbytes, want.num_layers)
    assert got.packed.layout == want.packed.layout
    for part in ("a", "b", "ranks", "scales"):  # (alignment gaps between the views are never read)
        g, w = getattr(got.packed, part), getattr(want.packed, part)
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w), part
    assert set(got.weights) == set(want.weights)
    for lm, (a, b) in want.weights.items():
        assert torch.equal(got.weights[lm][0], a) and torch.equal(got.weights[lm][1], b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapped_equals_fresh_load_for_every_variant(world, tmp_path, dtype):
    raw, adapters, _ = world
    spec = BaseModelSpec.from_hf_config(raw, 16)
    store = PackedStore(tmp_path / "packed", spec, dtype, 1 << 30)
    for name, path in adapters.items():
        assert store.load(path, name)[0] is None  # nothing written yet
        fresh = load_adapter(path, spec, dtype, adapter_id=name)
        key = store.load(path, name)[1]
        assert store.save(path, key, fresh)
        got, key2 = store.load(path, name)
        assert got is not None and key2 == key and got.adapter_id == name
        _same(got, fresh)
        assert not got.packed.buffer.is_pinned()
    st = store.stats()
    assert st["files"] == st["writes"] == len(adapters) and st["hits"] == len(adapters)
    assert st["bytes"] == sum(p.stat().st_size for p in (tmp_path / "packed").iterdir())


def test_changed_files_and_other_models_miss(world, tmp_path):
    raw, _, _ = world
    spec = BaseModelSpec.from_hf_config(raw, 16)
    folder = write_random_adapter(tmp_path / "ad", raw, 4, 8.0, ["q_proj", "v_proj"], seed=1)
    store = PackedStore(tmp_path / "packed", spec, torch.float32, 1 << 30)
    first = load_adapter(folder, spec, torch.float32)
    assert store.save(folder, store.load(folder, None)[1], first)
    assert store.load(folder, None)[0] is not None
    # another rank limit or dtype: not the same packed form
    assert PackedStore(tmp_path / "packed", BaseModelSpec.from_hf_config(raw, 8), torch.float32,
                       1 << 30).load(folder, None)[0] is None
    assert PackedStore(tmp_path / "packed", spec, torch.bfloat16, 1 << 30).load(folder, None)[0] is None
    # the weights rewritten in place (a hand-edited folder): the old packed form must not be served
    time.sleep(0.01)
    write_random_adapter(tmp_path / "ad", raw, 4, 8.0, ["q_proj", "v_proj"], seed=2)
    assert store.load(folder, None)[0] is None
    second = load_adapter(folder, spec, torch.float32)
    assert not torch.equal(second.packed.a["q_proj"], first.packed.a["q_proj"])
    # a key taken before the files changed is not saved under (the bytes read may be the new ones)
    stale = store.load(folder, None)[1]
    time.sleep(0.01)
    os.utime(folder / "adapter_config.json")
    assert not store.save(folder, stale, second)


def test_disk_bound_evicts_least_recently_used_and_restart_keeps_files(world, tmp_path):
    raw, _, _ = world
    spec = BaseModelSpec.from_hf_config(raw, 16)
    folders = [write_random_adapter(tmp_path / f"ad{i}", raw, 4, 8.0, ["q_proj"], seed=i) for i in range(4)]
    loaded = [load_adapter(f, spec, torch.float32) for f in folders]
    one = PackedStore(tmp_path / "probe", spec, torch.float32, 1 << 30)
    assert one.save(folders[0], one.load(folders[0], None)[1], loaded[0])
    size = one.nbytes
    store = PackedStore(tmp_path / "packed", spec, torch.float32, 2 * size + size // 2)  # room for two files
    for f, ad in zip(folders[:2], loaded):
        assert store.save(f, store.load(f, None)[1], ad)
        time.sleep(0.01)
    assert store.load(folders[0], None)[0] is not None  # 0 is now more recent than 1
    mapped = store.load(folders[0], None)[0]
    assert store.save(folders[2], store.load(folders[2], None)[1], loaded[2])
    st = store.stats()
    assert st["files"] == 2 and st["evictions"] == 1 and st["bytes"] <= store.max_bytes
    assert store.load(folders[1], None)[0] is None and store.load(folders[0], None)[0] is not None
    time.sleep(0.01)
    assert store.save(folders[3], store.load(folders[3], None)[1], loaded[3])  # evicts 2 (0 was used later)
    assert store.load(folders[2], None)[0] is None and store.load(folders[0], None)[0] is not None
    store._drop(next(k for k in store._files if k != store.load(folders[3], None)[1]))  # file of 0 goes
    assert store.load(folders[0], None)[0] is None
    _same(mapped, loaded[0])  # a live mapping outlives its file
    assert len(list((tmp_path / "packed").glob(f"*{SUFFIX}"))) == 1
    assert store.save(folders[1], store.load(folders[1], None)[1], loaded[1])
    # a restart finds the files (and removes a write a crash interrupted); a bound too small for one file: no write
    (tmp_path / "packed" / ".tmp-crashed").write_bytes(b"x" * 100)
    again = PackedStore(tmp_path / "packed", spec, torch.float32, 2 * size + size // 2)
    assert again.stats()["files"] == 2 and not (tmp_path / "packed" / ".tmp-crashed").exists()
    _same(again.load(folders[3], None)[0], loaded[3])
    auto = PackedStore(tmp_path / "packed", spec, torch.float32, -1)  # half the free space + what is held
    assert auto.max_bytes >= auto.nbytes + shutil.disk_usage(tmp_path).free // 3 and auto.stats()["files"] == 2
    tiny = PackedStore(tmp_path / "tiny", spec, torch.float32, size // 2)
    assert not tiny.save(folders[0], tiny.load(folders[0], None)[1], loaded[0])


@pytest.mark.parametrize("damage", ["truncate", "magic", "header"])
def test_damaged_file_falls_back_to_the_folder(world, tmp_path, damage):
    raw, adapters, _ = world
    spec = BaseModelSpec.from_hf_config(raw, 16)
    path = adapters["all-r8"] if "all-r8" in adapters else next(iter(adapters.values()))
    store = PackedStore(tmp_path / "packed", spec, torch.float32, 1 << 30)
    fresh = load_adapter(path, spec, torch.float32)
    assert store.save(path, store.load(path, None)[1], fresh)
    f = next((tmp_path / "packed").glob(f"*{SUFFIX}"))
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[:-100]
    elif damage == "magic":
        data[:8] = b"NOTPACK!"
    else:
        data[16:20] = b"{{{{"
    f.write_bytes(bytes(data))
    assert store.load(path, None)[0] is None
    assert store.stats()["errors"] == 1 and not f.exists()
    # the loader then reads the folder again and writes a good file
    cache = CpuAdapterCache(4, pin=False)
    registry = type("R", (), {"path_of": staticmethod(lambda key: path)})()
    loader = AdapterLoader(registry, spec, torch.float32, cache, packed_store=store)
    try:
        _same(loader.get_blocking("x", timeout=60), fresh)
        assert loader.phase_seconds["save"] > 0 and loader.phase_seconds["map"] == 0
        _wait_for(lambda: store.stats()["writes"] == 2)
        loader.invalidate("x")
        _same(loader.get_blocking("x", timeout=60), fresh)
        assert loader.phase_seconds["map"] > 0 and store.stats()["hits"] == 1
    finally:
        loader.close()


def _wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_slot_copy_of_a_mapped_adapter_equals_a_fresh_one(world, tmp_path):
    from test_packed_adapters import _real_parts, _slots

    _, adapters, base = world
    slots, cfg = _slots(base)
    spec = BaseModelSpec.from_hf_config(cfg.raw, 16)
    store = PackedStore(tmp_path / "packed", spec, torch.float32, 1 << 30)
    for name, path in adapters.items():
        fresh = load_adapter(path, spec, torch.float32, adapter_id=name)
        store.save(path, store.load(path, name)[1], fresh)
        mapped = store.load(path, name)[0]
        for st in slots.stacks.values():  # poison: a region the mapped copy skips fails the comparison
            for t in (st.a, st.b, st.scales):
                t.fill_(float("nan"))
            st.ranks.fill_(7)
        slots.start_load(0, fresh)
        slots.start_load(1, mapped)
        for x, y in zip(_real_parts(slots, 0), _real_parts(slots, 1), strict=True):
            assert torch.equal(x, y), name


def test_service_removes_packed_files_of_deleted_and_replaced_versions(world, tmp_path):
    from loramux.server.adapter_service import AdapterService

    raw, adapters, _ = world
    svc = AdapterService(tmp_path / "reg", raw, torch.float32, 2, 16, 4, packed_dir=tmp_path / "packed",
                         max_packed_bytes=1 << 30)
    try:
        names = list(adapters)[:3]
        for n in names[:2]:
            svc.register_dir(n, adapters[n])
            key = svc.resolve(n)
            svc.loader.get_blocking(key, timeout=60)
        _wait_for(lambda: svc.stats()["packed_files"] == 2)
        svc.register_dir(names[0], adapters[names[2]])  # a new version of names[0]: its old folder is pruned
        assert svc.stats()["packed_files"] == 1
        svc.delete(names[1])
        st = svc.stats()
        assert st["packed_files"] == 0 and not list((tmp_path / "packed").glob(f"*{SUFFIX}"))
        assert st["packed_writes_total"] == 2 and st["packed_evictions_total"] == 0
    finally:
        svc.close()


def test_upload_writes_the_packed_form_before_the_first_request(world, tmp_path):
    from loramux.server.adapter_service import AdapterService

    raw, adapters, _ = world
    svc = AdapterService(tmp_path / "reg", raw, torch.float32, 2, 16, 4, packed_dir=tmp_path / "packed",
                         max_packed_bytes=1 << 30)
    try:
        path = next(iter(adapters.values()))
        cfg, weights = (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()
        svc.upload("mine", cfg, weights)
        _wait_for(lambda: svc.stats()["packed_files"] == 1)
        fresh = load_adapter(path, svc.spec, torch.float32)
        got = svc.loader.get_blocking(svc.resolve("mine"), timeout=60)  # the first request's load: a map
        _same(got, fresh)
        phases = svc.loader.phase_seconds
        assert phases["map"] > 0 and phases["read"] == 0 and svc.stats()["packed_hits_total"] == 1
    finally:
        svc.close()


def test_load_path_bench_smoke(tmp_path):
    """loadtest/bench/bench_adapter_loads.py on the tiny shape: every path runs and reports a time."""
    from loramux.loadtest.bench.bench_adapter_loads import measure
    from loramux.server.models.shapes import shape_config

    row = measure(shape_config("tiny").raw, 4, tmp_path, repeat=2)
    assert row["packed_mb"] > 0 and row["mapped_over_folder"] > 0
    assert all(row[k] > 0 for k in ("folder_load_ms", "mapped_load_ms", "stage_from_fresh_ms", "map_and_stage_ms"))
