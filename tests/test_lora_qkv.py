"""kernels.lora.qkv_rope_kv: q|k|v LoRA expand fused with RoPE + KV-cache write (lora_qkv_triton) vs an fp64
reference and, under the Triton interpreter, vs the unfused chain (lora_linear, then rope_write_kv): bit for bit in
bf16/fp16, to a few fp32 ulps in fp32."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.lora import build_lora_meta, lora_linear, qkv_rope_kv
from loramux.kernels.rope_kv import rope_write_kv
from test_lora_kernels import BACKENDS, HAS_TRITON, INTERPRET, make_case, naive_add
from triton_interp import run_triton_cases

CASES = {  # name: (T, H, Hkv, D, R, rank choices, slot fill)
    "decode": (1, 4, 2, 16, 16, None, None),
    "mixed_gqa": (37, 4, 2, 16, 16, None, None),
    "head_dim_not_pow2": (9, 2, 1, 24, 16, None, None),
    "ranks_past_one_tile": (9, 2, 2, 16, 128, [0, 1, 65, 128], None),
    "no_adapter": (11, 4, 2, 16, 16, None, -1),
    "one_slot": (70, 2, 1, 32, 16, None, 3),
    "prefill": (300, 2, 1, 16, 16, None, None),  # T > 256: prefill tile rows (lora_meta.PREFILL_EXPAND_BM)
}
BS, BLOCKS = 4, 80


def setup(name, dtype, seed=0):
    T, H, Hkv, D, R, choices, fill = CASES[name]
    K = 32
    c = make_case(T, K=K, widths=(H * D, Hkv * D, Hkv * D), R=R, dtype=dtype, seed=seed, rank_choices=choices)
    if fill is not None:
        c["slots"].fill_(fill)
    g = torch.Generator().manual_seed(seed + 1)
    N = (H + 2 * Hkv) * D
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    positions = torch.randint(0, 50, (T,), generator=g)
    freqs = torch.rand(64, D // 2, generator=g) * 3
    cos, sin = torch.cat([freqs.cos()] * 2, dim=1), torch.cat([freqs.sin()] * 2, dim=1)
    slots = torch.randperm(BS * BLOCKS, generator=g)[:T]
    slots[::5] = -1  # CUDA-graph padding rows: no KV write
    cache = torch.randn(2, BLOCKS, BS, Hkv, D, generator=g).to(dtype)
    return c, w, (positions, cos, sin, slots, H, Hkv, D), cache


def run(c, w, rope, cache, backend, fused):
    kc, vc = cache[0].clone(), cache[1].clone()
    pos, cos, sin, slots, H, Hkv, D = rope
    meta = build_lora_meta(c["slots"], c["S"])
    q = qkv_rope_kv(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
                    (pos, cos, sin, kc, vc, slots, H, Hkv, D), backend=backend, rope_backend=backend, fused=fused)
    return q, kc, vc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_qkv_rope_kv_matches_reference(backend, fused, dtype, name):
    c, w, rope, cache = setup(name, dtype)
    q, kc, vc = run(c, w, rope, cache, backend, fused)
    pos, cos, sin, slots, H, Hkv, D = rope
    y = naive_add(dict(c, y0=torch.nn.functional.linear(c["x"].double(), w.double())))  # fp64 q|k|v + deltas
    T = y.shape[0]
    qr, kr, vr = y.split([H * D, Hkv * D, Hkv * D], dim=1)
    cs, sn = cos[pos].double()[:, None], sin[pos].double()[:, None]

    def rot(t):
        return t * cs + torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1) * sn
    q_ref, k_ref, v_ref = rot(qr.view(T, H, D)), rot(kr.view(T, Hkv, D)), vr.view(T, Hkv, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (q.double() - q_ref).norm() / q_ref.norm() < tol
    kref, vref = cache[0].clone().double().view(-1, Hkv, D), cache[1].clone().double().view(-1, Hkv, D)
    keep = slots >= 0
    kref[slots[keep]], vref[slots[keep]] = k_ref[keep], v_ref[keep]  # untouched blocks keep their contents
    for got, ref in ((kc, kref), (vc, vref)):
        assert (got.double().view(-1, Hkv, D) - ref).norm() / ref.norm() < tol


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_fused_equals_unfused_chain_bitwise(dtype, name):
    c, w, rope, cache = setup(name, dtype, seed=7)
    pos, cos, sin, slots, H, Hkv, D = rope
    kc, vc = cache[0].clone(), cache[1].clone()
    meta = build_lora_meta(c["slots"], c["S"])
    y = lora_linear(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend="triton")
    q = rope_write_kv(y, pos, cos, sin, kc, vc, slots, H, Hkv, D, backend="triton")
    fq, fkc, fvc = run(c, w, rope, cache, "triton", True)
    for got, want in ((fq, q), (fkc, kc), (fvc, vc)):
        if dtype == torch.float32:  # the delta's dot runs on [BM, D/2] tiles, not the expand's [BM, 128]: the
            assert (got - want).norm() <= 1e-6 * want.norm()  # fp32 sum order may differ in the last bits
        elif name == "prefill":  # at prefill tile rows such a last-bit fp32 difference can round a half-precision
            # input of the rotation 1 ulp apart: a few ulps of the tensor's scale
            err, scale = (got.float() - want.float()).abs().max(), want.float().abs().max()
            assert err <= 4 * torch.finfo(dtype).eps * scale, (err, scale)
        else:
            assert torch.equal(got, want)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_triton_interpreter_suite():
    run_triton_cases(__file__, "triton", {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": ""})
