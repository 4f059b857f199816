"""kernels.lora.lora_linear (base GEMM + LoRA, optionally overlapped on CUDA) vs an fp64 reference on CPU;
the stream overlap itself is exercised on the GPU (test_lora_overlap_gpu.py): on CPU it must fall back."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.lora import build_lora_meta, lora_linear
from test_lora_kernels import BACKENDS, HAS_TRITON, INTERPRET, check_y, make_case, naive_add
from triton_interp import run_triton_cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 9])
def test_lora_linear_is_gemm_plus_lora(backend, overlap, bias, T):
    c = make_case(T, seed=T + 10 * bias)
    g = torch.Generator().manual_seed(3)
    N, K = c["y0"].shape[1], c["x"].shape[1]
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    base = torch.nn.functional.linear(c["x"], w, b)
    meta = build_lora_meta(c["slots"], c["S"])
    y = lora_linear(c["x"], w, b, c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend=backend,
                    overlap=overlap)
    check_y(y, dict(c, y0=base), naive_add(dict(c, y0=base)))


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_triton_interpreter_suite():
    run_triton_cases(__file__, "triton", {"LORAMUX_KERNEL_BACKEND": ""})
