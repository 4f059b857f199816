"""kernels.lora.gate_up_silu: gate|up LoRA expand fused with SiLU*mul (lora_mlp_triton) vs an fp64 reference and,
under the Triton interpreter, bit for bit vs the unfused chain (lora_linear, then the Triton silu_mul)."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.lora import build_lora_meta, gate_up_silu, lora_linear
from test_lora_kernels import BACKENDS, HAS_TRITON, INTERPRET, TOL, make_case, naive_add
from triton_interp import run_triton_cases

CASES = {  # name: (T, K, I, R, rank choices, slots override)
    "decode": (1, 48, 40, 16, None, None),
    "mixed": (37, 48, 200, 16, None, None),
    "ranks_past_one_tile": (9, 48, 72, 128, [0, 1, 65, 128], None),
    "split_k": (20, 1024, 40, 16, None, None),  # K >= 1024: the shrink writes 2 partial sums
    "no_adapter": (11, 48, 40, 16, None, -1),
    "one_slot": (70, 48, 40, 16, None, 2),  # tiles of one segment only
    "prefill": (300, 48, 40, 16, None, None),  # T > 256: prefill tile rows (lora_meta.PREFILL_EXPAND_BM)
}


def setup(name, dtype, seed=0):
    T, K, I, R, choices, fill = CASES[name]
    c = make_case(T, K=K, widths=(I, I), R=R, dtype=dtype, seed=seed, rank_choices=choices)
    if fill is not None:
        c["slots"].fill_(fill)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(2 * I, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(2 * I, generator=g).to(dtype)
    return c, w, b


def call(c, w, b, backend, fused):
    meta = build_lora_meta(c["slots"], c["S"])
    return gate_up_silu(c["x"], w, b, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend=backend,
                        silu_backend=backend, fused=fused)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_gate_up_silu_matches_reference(backend, fused, dtype, name):
    c, w, b = setup(name, dtype)
    act = call(c, w, b, backend, fused)
    base = torch.nn.functional.linear(c["x"].double(), w.double(), b.double())
    y = naive_add(dict(c, y0=base))  # fp64 gate|up with each token's delta
    gate, up = y.chunk(2, dim=1)
    ref = torch.nn.functional.silu(gate) * up
    assert act.dtype == dtype and act.shape == ref.shape and not act.isnan().any()
    err = (act.double() - ref).norm() / ref.norm()
    assert err < (TOL[dtype] if dtype == torch.float32 else 2e-2), f"relative error {err:.3g}"


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_fused_equals_unfused_chain_bitwise(dtype, name):
    from loramux.kernels.fused_ops import silu_mul

    c, w, b = setup(name, dtype, seed=5)
    meta = build_lora_meta(c["slots"], c["S"])
    unfused = silu_mul(lora_linear(c["x"], w, b, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
                                   backend="triton"), backend="triton")
    assert torch.equal(call(c, w, b, "triton", True), unfused)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_triton_interpreter_suite():
    run_triton_cases(__file__, "triton", {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": ""})
