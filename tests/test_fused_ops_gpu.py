"""GPU tests of the Triton fused ops at Llama-3-8B shapes vs the torch references, incl. CUDA-graph capture."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.fused_ops import rms_norm, rms_norm_reference, silu_mul, silu_mul_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
HIDDEN, INTER = 4096, 14336  # Llama-3-8B


def _close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 32, 257, 2048])
def test_rms_norm_matches_reference(T, dtype):
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, HIDDEN, generator=g, device="cuda").to(dtype)
    r = torch.randn(T, HIDDEN, generator=g, device="cuda").to(dtype)
    w = (torch.rand(HIDDEN, generator=g, device="cuda") + 0.5).to(dtype)
    for res in (None, r):
        out, new_res = rms_norm(x, w, 1e-5, res, backend="triton")
        ref, ref_res = rms_norm_reference(x, w, 1e-5, res)
        _close(out, ref, dtype)
        assert torch.equal(new_res, ref_res)  # one rounding of x + r on both sides


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 32, 257, 2048])
def test_silu_mul_matches_reference(T, dtype):
    g = torch.Generator(device="cuda").manual_seed(T)
    gu = (torch.randn(T, 2 * INTER, generator=g, device="cuda") * 3).to(dtype)
    _close(silu_mul(gu, backend="triton"), silu_mul_reference(gu), dtype)


def test_cuda_graph_capture_decode():
    x = torch.randn(32, HIDDEN, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    gu = torch.randn(32, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    rms_norm(x, w, 1e-5, r, backend="triton"), silu_mul(gu, backend="triton")  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, new_res = rms_norm(x, w, 1e-5, r, backend="triton")
        act = silu_mul(gu, backend="triton")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_res = rms_norm_reference(x, w, 1e-5, r)
    _close(out, ref, torch.bfloat16)
    assert torch.equal(new_res, ref_res)
    _close(act, silu_mul_reference(gu), torch.bfloat16)


def test_engine_fused_equals_default_on_gpu(tmp_path, monkeypatch):
    """Tiny Llama in fp32 on CUDA with CUDA graphs: LORAMUX_FUSED_OPS=1 (Triton) gives the default path's tokens."""
    from engine_helpers import run_all
    from hf_models import build_tiny
    from loramux.server.engine.request import SamplingParams
    from loramux.server.engine.scheduler import SchedulerConfig
    from loramux.server.models.model_config import ModelConfig
    from loramux.server.runtime import build_engine

    model = build_tiny("llama", tmp_path / "llama", seed=5)
    prompts = [[(7 * i + j) % 300 + 1 for j in range(3 + 5 * i)] for i in range(8)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def tokens(fused: bool):
        monkeypatch.setenv("LORAMUX_FUSED_OPS", "1" if fused else "0")
        monkeypatch.delenv("LORAMUX_FUSED_OPS_BACKEND", raising=False)
        cfg = ModelConfig.from_dir(model)
        sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=256, max_loras=4)
        engine = build_engine(model, cfg, torch.float32, torch.device("cuda"), 256, 64, sched, [])
        assert engine.runner.model.norm.fused_backend == ("triton" if fused else None)
        engine.runner.enable_cuda_graphs(16)
        return run_all(engine, prompts, greedy)

    assert tokens(True) == tokens(False)


def _rope_kv_case(T, seed):
    """Llama-3-8B attention prologue: H=32, Hkv=8, D=128, bf16; qkv with a padded row; some padding slots."""
    from loramux.server.models.rope import RotaryEmbedding

    H, HKV, D, NB, BS = 32, 8, 128, 64, 16
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = (H + 2 * HKV) * D
    qkv = torch.randn(T, width + 64, generator=g, device="cuda").to(torch.bfloat16)[:, :width]
    rope = RotaryEmbedding(D, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           8192, 8192, "cuda")
    pos = torch.randint(0, 8192, (T,), generator=g, device="cuda")
    slots = torch.randperm(NB * BS, generator=g, device="cuda")[:T]
    slots[::7] = -1
    caches = [torch.full((NB, BS, HKV, D), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    return qkv, pos, rope, slots, caches, (H, HKV, D)


@pytest.mark.parametrize("T", [1, 32, 256])
def test_rope_write_kv_matches_reference(T):
    from loramux.kernels.rope_kv import rope_write_kv, rope_write_kv_reference

    qkv, pos, rope, slots, (kc, vc), heads = _rope_kv_case(T, T)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, *heads, backend="triton")
    q_ref = rope_write_kv_reference(qkv, pos, rope.cos, rope.sin, kc_ref, vc_ref, slots, *heads)
    _close(q, q_ref, torch.bfloat16)
    for c, r in ((kc, kc_ref), (vc, vc_ref)):
        assert torch.equal(c.isnan(), r.isnan())  # same cells written; padding rows (slot -1) untouched
        _close(c.nan_to_num(), r.nan_to_num(), torch.bfloat16)


def test_rope_write_kv_cuda_graph():
    from loramux.kernels.rope_kv import rope_write_kv, rope_write_kv_reference

    qkv, pos, rope, slots, (kc, vc), heads = _rope_kv_case(32, 1)
    rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, *heads, backend="triton")  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q = rope_write_kv(qkv, pos, rope.cos, rope.sin, kc, vc, slots, *heads, backend="triton")
    qkv.copy_(torch.randn_like(qkv))
    pos.copy_(pos.flip(0))
    kc.fill_(float("nan")), vc.fill_(float("nan"))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    graph.replay()
    torch.cuda.synchronize()
    _close(q, rope_write_kv_reference(qkv, pos, rope.cos, rope.sin, kc_ref, vc_ref, slots, *heads), torch.bfloat16)
    assert torch.equal(kc.isnan(), kc_ref.isnan()) and torch.equal(vc.isnan(), vc_ref.isnan())
    _close(kc.nan_to_num(), kc_ref.nan_to_num(), torch.bfloat16)
    assert torch.equal(vc.nan_to_num(), vc_ref.nan_to_num())
