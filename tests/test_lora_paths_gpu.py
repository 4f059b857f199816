"""GPU, Llama-3-8B shapes: lora_linear with the shrink on a side stream (overlapping the base GEMM) equals the
serial path bit for bit, eagerly and replayed from a CUDA graph (where the side stream becomes a parallel branch);
gate_up_silu's fused expand + SiLU*mul kernel matches the unfused chain and an fp64 reference."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.fused_ops import silu_mul
from loramux.kernels.lora import LoRAMeta, build_lora_meta, gate_up_silu, lora_linear
from loramux.server.runner.cuda_graphs import capture_graph
from test_lora_kernels_gpu import GROUPS, S, check_y, make, ref_add

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def weights(group, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    K, widths = GROUPS[group]
    return (torch.randn(sum(widths), K, generator=g, device="cuda") / K ** 0.5).to(dtype)


def call(c, w, meta, overlap):
    return lora_linear(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
                       backend="triton", overlap=overlap)


@pytest.mark.parametrize("T", [1, 32, 256, 2048])
@pytest.mark.parametrize("group", list(GROUPS))
def test_overlap_equals_serial(group, T):
    dtype = torch.bfloat16
    c, w = make(T, group, dtype, seed=T), weights(group, dtype, seed=T)
    meta = build_lora_meta(c["slots"], S)
    serial, over = call(c, w, meta, False), call(c, w, meta, True)
    torch.cuda.synchronize()
    assert torch.equal(over, serial)
    base = torch.nn.functional.linear(c["x"], w)
    check_y(over, dict(c, y0=base), ref_add(dict(c, y0=base)))


@pytest.mark.parametrize("T", [1, 64])
def test_overlap_in_cuda_graph(T):
    """One layer's four groups captured with overlap on; replays with new slots == eager serial."""
    dtype = torch.bfloat16
    cases = {k: make(T, k, dtype, seed=70 + i, r_max=16, rank_choices=(0, 4, 16)) for i, k in enumerate(GROUPS)}
    ws = {k: weights(k, dtype, seed=80 + i) for i, k in enumerate(GROUPS)}
    static_slots = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    meta = LoRAMeta.empty(512, S, "cuda")

    def step():
        build_lora_meta(static_slots, S, out=meta)
        return torch.cat([call(c, ws[k], meta, True) for k, c in cases.items()], dim=1)

    graph, out = capture_graph(step, torch.cuda.graph_pool_handle())
    g = torch.Generator(device="cuda").manual_seed(T)
    for slots in (torch.randint(-1, S, (T,), generator=g, device="cuda", dtype=torch.int32),
                  torch.full((T,), 5, dtype=torch.int32, device="cuda")):
        static_slots.copy_(slots)
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.cat([call(dict(c, slots=slots), ws[k], build_lora_meta(slots, S), False)
                           for k, c in cases.items()], dim=1)
        assert torch.equal(out, eager)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("T", [1, 32, 256, 2048])
def test_fused_gate_up_silu(T, overlap):
    dtype = torch.bfloat16
    c, w = make(T, "gate_up", dtype, seed=90 + T), weights("gate_up", dtype, seed=T)
    meta = build_lora_meta(c["slots"], S)
    fused = gate_up_silu(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
                         backend="triton", silu_backend="triton", fused=True, overlap=overlap)
    unfused = silu_mul(call(c, w, meta, False), backend="triton")
    torch.cuda.synchronize()
    # same dot tiles and roundings as the unfused chain: equal but for rare FMA-contraction differences
    assert (fused != unfused).float().mean() < 1e-3
    y = ref_add(dict(c, y0=torch.nn.functional.linear(c["x"], w)))
    gate, up = y.chunk(2, dim=1)
    ref = torch.nn.functional.silu(gate) * up
    assert not fused.isnan().any() and (fused.double() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("T", [1, 32, 2048])
def test_fused_qkv_rope_kv(T):
    from loramux.kernels.lora import qkv_rope_kv
    from loramux.kernels.rope_kv import rope_write_kv

    dtype, H, Hkv, D = torch.bfloat16, 32, 8, 128
    c, w = make(T, "qkv", dtype, seed=110 + T), weights("qkv", dtype, seed=T)
    meta = build_lora_meta(c["slots"], S)
    g = torch.Generator(device="cuda").manual_seed(T)
    pos = torch.randint(0, 4096, (T,), generator=g, device="cuda")
    freqs = torch.rand(4096, D // 2, generator=g, device="cuda") * 3
    cos, sin = torch.cat([freqs.cos()] * 2, dim=1), torch.cat([freqs.sin()] * 2, dim=1)
    slots = torch.randperm(16 * 256, generator=g, device="cuda")[:T]
    caches = [torch.zeros(256, 16, Hkv, D, dtype=dtype, device="cuda") for _ in range(4)]
    q = qkv_rope_kv(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
                    (pos, cos, sin, caches[0], caches[1], slots, H, Hkv, D), backend="triton", rope_backend="triton",
                    fused=True)
    y = call(c, w, meta, False)
    q_ref = rope_write_kv(y, pos, cos, sin, caches[2], caches[3], slots, H, Hkv, D, backend="triton")
    torch.cuda.synchronize()
    for got, want in ((q, q_ref), (caches[0], caches[2]), (caches[1], caches[3])):
        assert (got != want).float().mean() < 1e-3  # same math; the dot's tile shape may round rare sums apart
        assert not got.isnan().any() and (got.double() - want.double()).norm() / want.double().norm() < 1e-2

