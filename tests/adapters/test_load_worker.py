"""Disk -> CPU loads in worker processes give the same adapter, the same refusals, and leave no files behind."""
from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.adapters.cache import CpuAdapterCache
from loramux.adapters.demo import write_random_adapter
from loramux.adapters.errors import AdapterError
from loramux.adapters.loader import load_adapter
from loramux.adapters.loading import AdapterLoader
from loramux.adapters.registry import AdapterRegistry

from adapter_testlib import LLAMA

W = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry with a mixed-rank adapter, a NaN one, one over the rank limit; and a process loader over it."""
    tmp = tmp_path_factory.mktemp("load-worker")
    from loramux.adapters.spec import BaseModelSpec

    spec = dataclasses.replace(BaseModelSpec.from_hf_config(LLAMA), max_lora_rank=8)
    reg = AdapterRegistry(tmp / "reg")
    mixed = write_random_adapter(tmp / "mixed", LLAMA, r=8, alpha=16, seed=3, layers=[0],
                                 targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"])
    reg.add_dir("mixed", mixed)
    nan = write_random_adapter(tmp / "nan", LLAMA, r=4, alpha=8, targets=["q_proj", "down_proj"], seed=4)
    t = load_file(nan / W)
    key = sorted(k for k in t if "down_proj.lora_B" in k)[-1]
    t[key] = t[key].clone()
    t[key][1, 2] = math.nan
    save_file({k: v.contiguous() for k, v in t.items()}, nan / W)
    big = write_random_adapter(tmp / "big", LLAMA, r=16, alpha=16, targets=["q_proj"], seed=5)
    reg.add_dir("too-big-rank", big)
    ld = AdapterLoader(reg, spec, torch.bfloat16, CpuAdapterCache(8), processes=1, error_ttl_s=0.0)
    yield reg, spec, ld, {"mixed": mixed, "nan": nan, "big": big}
    ld.close()


def test_process_load_equals_thread_load(world):
    reg, spec, ld, paths = world
    got = ld.get_blocking("mixed", timeout=120)
    want = load_adapter(paths["mixed"], spec, torch.bfloat16, adapter_id="mixed")
    assert got.packed.layout == want.packed.layout  # the slot-ready form, view by view (alignment gaps are unset)
    for kind in ("a", "b", "ranks", "scales"):
        g, w = getattr(got.packed, kind), getattr(want.packed, kind)
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    assert got.scales == want.scales and got.nbytes == want.nbytes and got.max_rank == want.max_rank
    assert got.config == want.config and set(got.weights) == set(want.weights)
    for lm in want.weights:
        assert all(torch.equal(g, w) for g, w in zip(got.weights[lm], want.weights[lm]))
    phases = ld.phase_seconds
    assert {"read", "pack", "check", "write", "transfer"} <= set(phases) and all(v >= 0 for v in phases.values())
    assert not any(ld.processes.dir.iterdir())  # the worker's file is gone once read back


def test_process_load_refusals_match_thread_load(world):
    reg, spec, ld, paths = world
    for name in ("too-big-rank", "missing"):
        with pytest.raises(AdapterError) as via_process:
            ld.get_blocking(name, timeout=120)
        path = reg.path_of(name)
        if path is None:
            assert via_process.value.status == 404
            continue
        with pytest.raises(AdapterError) as via_thread:
            load_adapter(path, spec, torch.bfloat16)
        assert (str(via_process.value), via_process.value.field, via_process.value.status) == \
               (str(via_thread.value), via_thread.value.field, via_thread.value.status)
    with pytest.raises(AdapterError, match="contains NaN") as ei:
        ld.processes.load(paths["nan"], spec, torch.bfloat16, "nan", False, __import__("collections").Counter())
    assert ei.value.status == 400 and "down_proj.lora_B" in ei.value.field
    assert not any(ld.processes.dir.iterdir())


def test_adapter_error_pickles_with_field_and_status():
    err = pickle.loads(pickle.dumps(AdapterError("too big", "r", 413)))
    assert (str(err), err.field, err.status) == ("too big", "r", 413)
