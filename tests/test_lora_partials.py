"""The decode shrink's split-K partials summed by one launch (kernels/lora_triton.py REDUCE_PARTIALS, on by default)
vs summed inside the expands: bit-equal, and independent of padding (Triton interpreter; subprocess from CPU runs)."""
from __future__ import annotations

import pytest
import torch

from test_lora_kernels import HAS_TRITON, INTERPRET, check_y, make_case, naive_add, run_add
from triton_interp import run_triton_cases


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, padded", [(1, 2), (9, 16), (40, 64)])
def test_triton_summed_partials_bit_equal(monkeypatch, dtype, T, padded):
    """A decode shrink's 4 split-K partials (K = 2048) summed by one launch (lora_triton.REDUCE_PARTIALS, the
    default) give y bit-equal to the expands summing them in-kernel; and a step's rows do not depend on how far
    its T is padded (mixed-step graphs pad T, eager steps do not)."""
    from loramux.kernels import lora_triton

    c = make_case(T, K=2048, dtype=dtype, seed=19 + T)
    ys = []
    for on in (True, False):
        monkeypatch.setattr(lora_triton, "REDUCE_PARTIALS", on)
        assert lora_triton.new_partials(c["x"], c["A"], c["ranks"]).shape[0] == 4 + on
        ys.append(run_add(c, "triton"))
    check_y(ys[0], c, naive_add(c))
    assert torch.equal(ys[0], ys[1])
    monkeypatch.setattr(lora_triton, "REDUCE_PARTIALS", True)
    pad = padded - T
    g = torch.Generator().manual_seed(T)
    big = dict(c, x=torch.cat([c["x"], torch.randn(pad, 2048, generator=g).to(dtype)]),
               y0=torch.cat([c["y0"], torch.zeros(pad, c["y0"].shape[1], dtype=dtype)]),
               slots=torch.cat([c["slots"], torch.full((pad,), -1, dtype=torch.int32)]))
    assert torch.equal(run_add(big, "triton")[:T], ys[0])


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or Triton cases already run in-process")
def test_triton_interpreter_suite():
    run_triton_cases(__file__, "triton", {"LORAMUX_KERNEL_BACKEND": ""})
