"""Fused q/k/v split + RoPE + KV-cache write (kernels.rope_kv): reference vs the unfused model composition,
Triton under TRITON_INTERPRET=1 vs the reference, and the decoder's fused path end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_interp import run_triton_cases
from loramux.kernels import rope_kv
from loramux.kernels.attention import write_kv_reference
from loramux.kernels.rope_kv import rope_write_kv, rope_write_kv_reference
from loramux.server.models.rope import RotaryEmbedding

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEADS = [(8, 2, 64), (8, 2, 128), (4, 4, 64), (4, 4, 128)]  # (H, Hkv, D): GQA and MHA
NB, BS, P = 8, 16, 200  # cache blocks, block size, cos/sin table rows
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _case(T, H, Hkv, D, dtype, seed, pad=0, drop=()):
    """-> (qkv [T, width] with row stride width + 2*pad, positions, rope, slots) ; rows in `drop` get slot -1."""
    g = torch.Generator().manual_seed(seed)
    width = (H + 2 * Hkv) * D
    qkv = torch.randn(T, width + 2 * pad, generator=g).to(dtype)[:, pad:pad + width]
    positions = torch.randint(0, P, (T,), generator=g)
    slots = torch.randperm(NB * BS, generator=g)[:T]
    slots[list(drop)] = -1
    return qkv, positions, RotaryEmbedding(D, 500000.0, LLAMA3, 128, P), slots


def _caches(Hkv, D, dtype, fill=float("nan")):
    return torch.full((NB, BS, Hkv, D), fill, dtype=dtype), torch.full((NB, BS, Hkv, D), fill, dtype=dtype)


def _original(qkv, positions, rope, kc, vc, slots, H, Hkv, D):
    """The decoder's pre-fusion code (split, reshape, RotaryEmbedding, write_kv_reference), rows with slot < 0
    dropped first; rotate_half spelled out as it was in server/models/rope.py."""
    T = qkv.shape[0]
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)

    def rot(x):
        xf = x.float()
        return (xf * cos + torch.cat([-xf[..., D // 2:], xf[..., :D // 2]], dim=-1) * sin).to(x.dtype)

    q2, k2 = rope(positions, q, k)
    assert torch.equal(q2, rot(q)) and torch.equal(k2, rot(k))
    keep = slots >= 0
    write_kv_reference(k2[keep], v[keep], kc, vc, slots[keep])
    return q2


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D", HEADS)
@pytest.mark.parametrize("drop", [(), (0, 3), (0, 1, 2, 3, 4)])  # none / some / all rows are padding
def test_reference_equals_unfused_composition(H, Hkv, D, dtype, drop):
    qkv, pos, rope, slots = _case(5, H, Hkv, D, dtype, seed=H + D, pad=3, drop=drop)
    kc, vc = _caches(Hkv, D, dtype, fill=0.5)
    kc2, vc2 = kc.clone(), vc.clone()
    q = rope_write_kv_reference(qkv, pos, rope.cos, rope.sin, kc, vc, slots, H, Hkv, D)
    q2 = _original(qkv, pos, rope, kc2, vc2, slots, H, Hkv, D)
    assert q.dtype == dtype and q.shape == (5, H, D)
    assert torch.equal(q, q2) and torch.equal(_bits(kc), _bits(kc2)) and torch.equal(_bits(vc), _bits(vc2))


def test_dispatch_and_shape_checks(monkeypatch):
    qkv, pos, rope, slots = _case(3, 4, 2, 64, torch.float32, seed=1)
    outs = []
    for backend in ("torch", "auto"):  # auto on CPU -> torch
        kc, vc = _caches(2, 64, torch.float32)
        outs.append((rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, 4, 2, 64, backend=backend), kc, vc))
    assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(*outs))
    kc, vc = _caches(2, 64, torch.float32)
    with pytest.raises(ValueError):  # wrong head count
        rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, 3, 2, 64, backend="torch")
    with pytest.raises(ValueError):  # cache dtype differs from the activations
        rope_write_kv(qkv, pos, rope.cos, rope.sin, kc.half(), vc.half(), slots, 4, 2, 64, backend="torch")
    monkeypatch.setenv("LORAMUX_FUSED_OPS_BACKEND", "torch")
    assert rope_kv.resolve_backend("auto", "cuda") == "torch"
    q0 = rope_write_kv(qkv[:0], pos[:0], rope.cos, rope.sin, kc, vc, slots[:0], 4, 2, 64)
    assert q0.shape == (0, 4, 64)


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so output cells a kernel never writes fail the comparison."""
    real = torch.empty

    def poisoned(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("H,Hkv,D", HEADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rope_kv(dtype, H, Hkv, D, T, nan_empty):
    drop = [i for i in (0, 2, 30) if i < T and T > 1]  # some padding rows (never all: T=1 keeps its slot)
    qkv, pos, rope, slots = _case(T, H, Hkv, D, dtype, seed=T * 7 + D, pad=5, drop=drop)
    kc, vc = _caches(Hkv, D, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, H, Hkv, D, backend="triton")
    q_ref = rope_write_kv_reference(qkv, pos, rope.cos, rope.sin, kc_ref, vc_ref, slots, H, Hkv, D)
    tol = TOL[dtype]
    assert q.dtype == dtype and q.shape == (T, H, D)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=tol, atol=tol)
    flat_k, flat_v = kc.view(-1, Hkv, D), vc.view(-1, Hkv, D)
    ref_k, ref_v = kc_ref.view(-1, Hkv, D), vc_ref.view(-1, Hkv, D)
    written = slots[slots >= 0]
    torch.testing.assert_close(flat_k[written].float(), ref_k[written].float(), rtol=tol, atol=tol)
    assert torch.equal(_bits(flat_v[written]), _bits(ref_v[written]))  # v is a plain copy
    untouched = torch.ones(NB * BS, dtype=torch.bool)
    untouched[written] = False
    assert torch.equal(_bits(flat_k[untouched]), _bits(ref_k[untouched]))  # still the NaN poison, bit for bit
    assert torch.equal(_bits(flat_v[untouched]), _bits(ref_v[untouched]))


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
def test_triton_all_padding_and_empty(nan_empty):
    qkv, pos, rope, slots = _case(4, 8, 2, 64, torch.bfloat16, seed=3, drop=(0, 1, 2, 3))
    kc, vc = _caches(2, 64, torch.bfloat16, fill=1.0)
    q = rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, 8, 2, 64, backend="triton")
    q_ref = rope_write_kv_reference(qkv, pos, rope.cos, rope.sin, kc.clone(), vc.clone(), slots, 8, 2, 64)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=1e-2, atol=1e-2)  # q still computed
    assert bool((kc == 1).all()) and bool((vc == 1).all())  # no cache write at all
    q0 = rope_write_kv(qkv[:0], pos[:0], rope.cos, rope.sin, kc, vc, slots[:0], 8, 2, 64, backend="triton")
    assert q0.shape == (0, 8, 64)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or Triton cases already run in-process")
def test_triton_interpreter_suite():
    """Re-runs the Triton cases of this file under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_triton_cases(__file__, "test_triton_rope_kv or test_triton_all_padding", {"LORAMUX_FUSED_OPS_BACKEND": ""},
                     timeout=600, allow_skips=False)


_ENGINE_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from engine_helpers import make_engine, run_all
from loramux.server.engine.request import SamplingParams
from loramux.server.models import layers
calls = []
real = layers.rope_write_kv
layers.rope_write_kv = lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw)
engine = make_engine({model!r})
out = run_all(engine, {prompts!r}, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
print(json.dumps([out, sorted(set(calls))]))
"""


def _engine_tokens(model_dir: Path, prompts, backend: str | None):
    """Greedy tokens in a fresh interpreter -> (tokens, backends rope_write_kv was called with). backend None:
    LORAMUX_FUSED_OPS=0; "triton": under TRITON_INTERPRET=1."""
    env = dict(os.environ, LORAMUX_FUSED_OPS="0" if backend is None else "1", LORAMUX_FUSED_OPS_BACKEND=backend or "",
               TRITON_INTERPRET="1" if backend == "triton" else "0", LORAMUX_KERNEL_BACKEND="torch",
               LORAMUX_ATTENTION_BACKEND="torch")
    code = _ENGINE_SCRIPT.format(tests=str(Path(__file__).parent), model=str(model_dir), prompts=prompts)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,overrides", [
    ("llama", {}),
    ("llama", {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64}),  # MHA, D=64 (> hidden/heads)
    ("qwen2", {}),  # qkv bias
    ("mistral", {"sliding_window": 6}),  # window shorter than the prompts
])
def test_engine_fused_rope_kv_matches_unfused_and_transformers(tmp_path, kind, overrides):
    from hf_models import build_tiny, hf_greedy

    model = build_tiny(kind, tmp_path / kind, seed=5, **overrides)
    prompts = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    fused, calls = _engine_tokens(model, prompts, "torch")
    assert calls == ["torch"]  # the decoder took the fused path
    unfused, calls = _engine_tokens(model, prompts, None)
    assert calls == [] and fused == unfused
    assert fused == [hf_greedy(model, p, 8) for p in prompts]
    if HAS_TRITON and kind == "llama":  # the Triton kernel inside the real decoder (interpreter, fp32)
        assert _engine_tokens(model, prompts, "triton") == [fused, ["triton"]]
