"""kernels.lora_norm: a single-slice LoRA expand deferred into the residual add + RMSNorm after it
(lora_norm_triton) vs an fp64 reference, and under the Triton interpreter vs the unfused Triton chain."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.lora import build_lora_meta, lora_linear
from loramux.kernels.lora_norm import MAX_TOKENS, add_norm, linear_deferred
from test_lora_kernels import BACKENDS, HAS_TRITON, INTERPRET, make_case, naive_add
from triton_interp import run_triton_cases

EPS = 1e-5
CASES = {  # name: (T, K, H, R, rank choices, slots override, with residual)
    "decode": (1, 48, 40, 16, None, None, True),
    "batch": (37, 48, 200, 16, None, None, True),
    "first_layer": (9, 48, 200, 16, None, None, False),  # no residual yet: y becomes the stream
    "chunks": (12, 48, 1000, 16, None, None, True),  # H over one 512-column chunk, not a multiple of it
    "ranks_past_one_tile": (9, 48, 72, 128, [0, 1, 17, 65, 128], None, True),
    "split_k": (20, 1024, 40, 16, None, None, True),  # K >= 1024: the shrink writes 2 partial sums
    "no_adapter": (11, 48, 40, 16, None, -1, True),
    "one_slot": (MAX_TOKENS, 48, 40, 16, None, 2, True),
}


def setup(name, dtype, seed=0):
    T, K, H, R, choices, fill, with_res = CASES[name]
    c = make_case(T, K=K, widths=(H,), R=R, dtype=dtype, seed=seed, rank_choices=choices)
    if fill is not None:
        c["slots"].fill_(fill)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(H, K, generator=g) / K ** 0.5).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    res = torch.randn(T, H, generator=g).to(dtype) if with_res else None
    return c, w, norm_w, res


def fused_chain(c, w, norm_w, res, backend):
    meta = build_lora_meta(c["slots"], c["S"])
    y, pending = linear_deferred(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
                                 backend=backend, enabled=True)
    assert (pending is not None) == (backend == "triton")  # the Triton path defers; torch adds at once
    return add_norm(y, res, norm_w, EPS, pending, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_deferred_expand_add_norm_matches_reference(backend, dtype, name):
    c, w, norm_w, res = setup(name, dtype)
    out, stream = fused_chain(c, w, norm_w, res, backend)
    y = naive_add(dict(c, y0=torch.nn.functional.linear(c["x"].double(), w.double())))  # fp64 linear + delta
    ref_stream = y + (res.double() if res is not None else 0)
    ref = norm_w.double() * ref_stream * torch.rsqrt(ref_stream.pow(2).mean(-1, keepdim=True) + EPS)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((stream, ref_stream), (out, ref)):
        assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
        err = (got.double() - want).norm() / want.norm()
        assert err < tol, f"relative error {err:.3g}"


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_triton_deferred_equals_unfused_chain(dtype, name):
    """Same rounding points as lora_linear + fused_ops.rms_norm (torch backend: the interpreter's own bf16 casts
    truncate, see fused_ops_triton._cast); only the delta's summation order differs, so the outputs agree to a
    unit in the last place, and nearly all 16-bit values are identical."""
    from loramux.kernels.fused_ops import rms_norm

    c, w, norm_w, res = setup(name, dtype, seed=5)
    res_before = None if res is None else res.clone()
    meta = build_lora_meta(c["slots"], c["S"])
    y = lora_linear(c["x"], w, None, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend="torch")
    out_u, stream_u = rms_norm(y, norm_w, EPS, res, backend="torch")
    out, stream = fused_chain(c, w, norm_w, res, "triton")
    if res is not None:
        assert torch.equal(res, res_before)  # the residual input is never written
    ulp = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    for got, want in ((stream, stream_u), (out, out_u)):
        diff = (got.double() - want.double()).abs()
        assert (diff <= ulp * (1 + want.double().abs())).all(), f"max diff {diff.max():.3g}"
        if dtype != torch.float32:  # nearly all elements round to the same 16-bit value
            assert (diff == 0).double().mean() > 0.9
    no_delta = (c["slots"] < 0) | (c["ranks"][c["slots"].clamp(min=0).long(), 0] == 0)
    assert torch.equal(stream[no_delta], stream_u[no_delta])  # rows without a delta: exactly the norm kernel


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_triton_interpreter_suite():
    run_triton_cases(__file__, "triton", {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": ""})
