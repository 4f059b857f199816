"""Packed adapters (adapters.packed): one buffer per adapter, per-module stacks over layers, and the slot copy
that uses them (a few strided copies) gives exactly the slot contents of the tensor-by-tensor copy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramux.adapters.loader import load_adapter
from loramux.kernels.lora_layout import b_block
from loramux.adapters.packed import GROUPS
from loramux.adapters.spec import BaseModelSpec
from loramux.server.models.llama import LORA_TARGETS, DecoderModel
from loramux.server.models.model_config import ModelConfig
from loramux.server.runner.lora_slots import LoRASlots


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapters_world import peft_world

    return peft_world(tmp_path_factory.mktemp("packed"))


def test_groups_match_the_decoder():
    assert {m: (g, i) for g, mods in GROUPS for i, m in enumerate(mods)} == LORA_TARGETS


def _slots(base, num_slots=4, max_rank=16):
    cfg = ModelConfig.from_dir(base)
    model = DecoderModel(cfg, 64, torch.float32, torch.device("cpu"))
    return LoRASlots(model, num_slots, max_rank, torch.float32, torch.device("cpu"), table=None,
                     async_copies=False), cfg


def _real_parts(slots: LoRASlots, slot: int):
    """Per layer and group: ranks, scales, and A/B restricted to each slice's real rank (padding is never read)."""
    out = []
    R = slots.max_rank
    for layer in slots.model.layers:
        for g, _ in GROUPS:
            lin = getattr(layer, g)
            st = lin.lora
            out.append(st.ranks[slot].clone())
            out.append(st.scales[slot].clone())
            for i, r in enumerate(st.ranks[slot].tolist()):
                lo, hi = lin.slice_offsets[i], lin.slice_offsets[i + 1]
                out.append(st.a[slot, i * R:i * R + r].clone())
                out.append(b_block(st.b[slot], lo, hi, r).clone())
    return out


def test_packed_views_equal_the_weights_and_slot_copies_agree(world):
    base, adapters = world
    slots, cfg = _slots(base)
    spec = BaseModelSpec.from_hf_config(cfg.raw, 16)
    for name, path in adapters.items():
        ad = load_adapter(path, spec, torch.float32)
        assert ad.packed is not None and ad.packed.num_layers == cfg.num_layers
        plain = ad.unpacked()
        assert plain.packed is None
        for lm, (a, b) in ad.weights.items():
            assert torch.equal(a, plain.weights[lm][0]) and torch.equal(b, plain.weights[lm][1])
            g, i = LORA_TARGETS[lm[1]]
            assert ad.packed.ranks[g][lm[0], i] == a.shape[0]
            assert ad.packed.scales[g][lm[0], i] == pytest.approx(ad.scales[lm])
        # poison both slots, then write one adapter each way: the real-rank regions must be identical
        for st in slots.stacks.values():
            for t in (st.a, st.b, st.scales):
                t.fill_(float("nan"))
            st.ranks.fill_(7)
        slots.start_load(0, ad)  # packed path
        slots.start_load(1, plain)  # tensor-by-tensor path
        got, want = _real_parts(slots, 0), _real_parts(slots, 1)
        assert all(torch.equal(x, y) for x, y in zip(got, want)), name
        targeted = {(layer, LORA_TARGETS[m][0]) for layer, m in ad.weights}
        for layer_idx, layer in enumerate(slots.model.layers):  # untargeted groups read rank 0 in both
            for g, _ in GROUPS:
                if (layer_idx, g) not in targeted:
                    assert not getattr(layer, g).lora.ranks[0].any(), (name, layer_idx, g)


def test_packed_copy_is_few_copies(world, monkeypatch):
    """The reason for packing: a handful of copy_ calls per adapter, not one per (layer, module) tensor."""
    base, adapters = world
    slots, cfg = _slots(base)
    ad = load_adapter(adapters["all-r8"], BaseModelSpec.from_hf_config(cfg.raw, 16), torch.float32)
    calls = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: (
        calls.append(1), real(self, src, non_blocking))[1])
    slots.start_load(0, ad)
    assert len(calls) == 2 * 7 + 2 * 4  # A and B per module, ranks and scales per group
    calls.clear()
    slots.start_load(1, ad.unpacked())
    assert len(calls) >= 2 * 7 * cfg.num_layers


def test_pack_on_demand_and_layer_check():
    """Adapters built in memory (benchmarks) pack on pin_memory()/pack(); a layer past the model is refused."""
    from loramux.adapters.loader import LoadedAdapter
    from loramux.adapters.packed import pack

    a, b = torch.randn(4, 8), torch.randn(6, 4)
    ad = LoadedAdapter("x", None, {(1, "k_proj"): (a, b)}, {(1, "k_proj"): 0.5}, 4, 0, num_layers=3).pack()
    assert ad.packed.a["k_proj"].shape == (3, 4, 8) and not ad.packed.a["k_proj"][[0, 2]].any()
    assert torch.equal(ad.weights[(1, "k_proj")][1], b) and ad.packed.ranks["qkv_proj"].tolist() == [
        [0, 0, 0], [0, 4, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="layer"):
        pack({(3, "k_proj"): (a, b)}, {(3, "k_proj"): 1.0}, 3, torch.float32)


def test_reused_read_buffer_decodes_like_safetensors(world, tmp_path, monkeypatch):
    """Disk loads read into a per-thread buffer and view it in place; the packed copy must not depend on it."""
    from safetensors.torch import load_file

    from loramux.adapters.safetensors_io import WEIGHTS_FILE, load_safetensors, read_reusing

    base, adapters = world
    spec = BaseModelSpec.from_hf_config(ModelConfig.from_dir(base).raw, 16)
    first = load_adapter(adapters["all-r8"], spec, torch.float32)
    snapshot = {lm: (a.clone(), b.clone()) for lm, (a, b) in first.weights.items()}
    for name, path in adapters.items():  # later loads overwrite the same read buffer
        view = read_reusing(path / WEIGHTS_FILE, 1 << 30, WEIGHTS_FILE)
        ours, ref = load_safetensors(view), load_file(str(path / WEIGHTS_FILE))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name
        load_adapter(path, spec, torch.float32)
    assert all(torch.equal(a, snapshot[lm][0]) and torch.equal(b, snapshot[lm][1])
               for lm, (a, b) in first.weights.items())
    grown = tmp_path / "w.safetensors"
    grown.write_bytes(b"x" * 10)
    real_stat = Path.stat
    small = type("Stat", (), {"st_size": 5})()  # stat said 5 bytes; 10 are read: the file grew meanwhile
    monkeypatch.setattr(Path, "stat", lambda self, *a, **k: small if self == grown else real_stat(self, *a, **k))
    with pytest.raises(Exception, match="changed size"):
        read_reusing(grown, 100, "w")
