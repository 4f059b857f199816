"""CPU tests of the fused ops: references vs torch formulas, Triton under TRITON_INTERPRET=1, engine opt-in path."""
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
from loramux.kernels import fused_ops
from loramux.kernels.fused_ops import rms_norm, rms_norm_reference, silu_mul, silu_mul_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SHAPES = [(1, 64), (7, 48), (5, 200)]  # H not a power of two; a single token


def _rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    tol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def _plain_rms(x, w, eps):  # the model's unfused formula (server/models/layers.py RMSNorm)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_reference_matches_model_formula(shape, dtype):
    x, r = _rand(shape, dtype, 0), _rand(shape, dtype, 1)
    w = _rand(shape[-1:], dtype, 2, 0.5) + 1
    out, res = rms_norm_reference(x, w, 1e-5)
    assert res is x and torch.equal(out, _plain_rms(x, w, 1e-5))
    out, res = rms_norm_reference(x, w, 1e-6, residual=r)
    assert torch.equal(res, r + x) and torch.equal(out, _plain_rms(r + x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_mul_reference_matches_torch(shape, dtype):
    gu = _rand((shape[0], 2 * shape[1]), dtype, 3, 3.0)
    g, u = gu[:, :shape[1]], gu[:, shape[1]:]
    ref = silu_mul_reference(gu)
    _close(ref, torch.nn.functional.silu(g) * u, dtype)
    _close(ref, (g.float() * torch.sigmoid(g.float()) * u.float()).to(dtype), dtype)


def test_dispatch_torch_backend_and_env(monkeypatch):
    x, w = _rand((3, 16), torch.float32, 0), torch.ones(16)
    assert torch.equal(rms_norm(x, w, 1e-5, backend="torch")[0], rms_norm_reference(x, w, 1e-5)[0])
    gu = _rand((3, 32), torch.float32, 1)
    assert torch.equal(silu_mul(gu, backend="torch"), silu_mul_reference(gu))
    monkeypatch.setenv("LORAMUX_FUSED_OPS_BACKEND", "torch")
    assert fused_ops.resolve_backend("auto", "cuda") == "torch"
    monkeypatch.setenv("LORAMUX_FUSED_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError):
        fused_ops.resolve_backend("auto", "cpu")
    monkeypatch.delenv("LORAMUX_FUSED_OPS", raising=False)
    assert fused_ops.enabled()  # on by default
    monkeypatch.setenv("LORAMUX_FUSED_OPS", "0")
    assert not fused_ops.enabled()
    monkeypatch.setenv("LORAMUX_FUSED_OPS", "1")
    assert fused_ops.enabled()


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_rms_norm(shape, dtype):
    x, r = _rand(shape, dtype, 4), _rand(shape, dtype, 5)
    w = _rand(shape[-1:], dtype, 6, 0.5) + 1
    for res in (None, r):
        out, new_res = rms_norm(x, w, 1e-5, residual=res, backend="triton")
        ref, ref_res = rms_norm_reference(x, w, 1e-5, residual=res)
        _close(out, ref, dtype)
        assert torch.equal(new_res, ref_res)  # the residual add is exact: both round x + r once
    xs = _rand((shape[0], shape[1] * 2), dtype, 7)[:, ::2]  # strided rows
    _close(rms_norm(xs, w, 1e-5, backend="triton")[0], rms_norm_reference(xs, w, 1e-5)[0], dtype)
    w32 = w.float()  # mixed: bf16 activations, fp32 weight -> fp32 output
    _close(rms_norm(x, w32, 1e-5, r, backend="triton")[0], rms_norm_reference(x, w32, 1e-5, r)[0], torch.float32)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(2, 1500)])  # I > one 1024-column tile
def test_triton_silu_mul(shape, dtype):
    gu = _rand((shape[0], 2 * shape[1]), dtype, 8, 3.0)
    _close(silu_mul(gu, backend="triton"), silu_mul_reference(gu), dtype)
    wide = _rand((shape[0], 2 * shape[1] + 8), dtype, 9, 3.0)[:, 4:-4]  # row stride != 2I
    _close(silu_mul(wide, backend="triton"), silu_mul_reference(wide), dtype)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or Triton cases already run in-process")
def test_triton_interpreter_suite():
    """Re-runs the Triton cases of this file under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_triton_cases(__file__, "triton_rms or triton_silu", {"LORAMUX_FUSED_OPS_BACKEND": ""}, allow_skips=False)


_ENGINE_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from engine_helpers import make_engine, run_all
from loramux.server.engine.request import SamplingParams
engine = make_engine({model!r})
assert engine.runner.model.norm.fused_backend == {backend!r}, engine.runner.model.norm.fused_backend
print(json.dumps(run_all(engine, {prompts!r}, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))))
"""


def _engine_tokens(model_dir: Path, prompts, backend: str | None) -> list[list[int]]:
    """Greedy tokens in a fresh interpreter; backend None: flag off; "triton": under TRITON_INTERPRET=1."""
    env = dict(os.environ, LORAMUX_FUSED_OPS="0" if backend is None else "1", LORAMUX_FUSED_OPS_BACKEND=backend or "",
               TRITON_INTERPRET="1" if backend == "triton" else "0", LORAMUX_KERNEL_BACKEND="torch",
               LORAMUX_ATTENTION_BACKEND="torch")
    code = _ENGINE_SCRIPT.format(tests=str(Path(__file__).parent), model=str(model_dir), prompts=prompts,
                                 backend=backend)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_engine_fused_path_matches_default_and_transformers(tmp_path):
    from hf_models import build_tiny, hf_greedy

    model = build_tiny("llama", tmp_path / "llama", seed=11)
    prompts = [[5, 17, 99, 3], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    fused = _engine_tokens(model, prompts, "torch")
    assert fused == _engine_tokens(model, prompts, None)
    assert fused == [hf_greedy(model, p, 8) for p in prompts]
    if HAS_TRITON:  # the Triton kernels inside the real decoder (interpreter; fp32, so tokens must agree)
        assert _engine_tokens(model, prompts, "triton") == fused
