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


KNOBS = {"LORAMUX_LORA_DECODE_K_PER_SPLIT": "128", "LORAMUX_LORA_MAX_SPLITS": "32", "LORAMUX_LORA_DECODE_N_ITERS": "1"}


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_decode_launch_knobs():
    """The decode launch-shape knobs (kernels/lora_triton.py) change the plan (more split-K partials, one column
    tile per expand program) and the kernels stay correct with them: the fused-expand and two-launch cases."""
    import os
    import subprocess
    import sys

    code = ("import torch; from loramux.kernels.lora_triton import shrink_plan as p; "
            "print(p(32, 4096, 3, 16, torch.device('cpu'))['parts'], p(32, 1024, 2, 16, torch.device('cpu'))['parts'])")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **KNOBS), capture_output=True, text=True)
    assert out.stdout.split() == ["32", "8"], out.stderr[-2000:]  # defaults: 8 and 2
    tests = os.path.dirname(__file__)
    env = {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": "", **KNOBS}
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and (split_k or mixed)", env)
    run_triton_cases(os.path.join(tests, "test_lora_kernels.py"), "triton and shrink_then_expand", env)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_summed_partials_default_and_switch_off():
    """LORAMUX_LORA_REDUCE_PARTIALS (on by default): a decode shrink's P split-K partials get one more slice holding
    their sum, added in the order the expands add them (buf[0] + buf[1] + ...), which is what the expand then reads;
    with the switch at 0 there is no extra slice and the fused MLP expand stays bit-equal to the unfused chain."""
    import os
    import subprocess
    import sys

    code = ("import torch; from loramux.kernels import lora_triton as t; from loramux.kernels.lora import "
            "build_lora_meta; x = torch.randn(32, 2048); a = torch.randn(2, 16, 2048); r = torch.tensor([[16], [5]],"
            " dtype=torch.int32); meta = build_lora_meta(torch.tensor([0, 1] * 16), 2); buf = t.new_partials(x, a, r);"
            " out = t.shrink_partials(x, a, r, meta, buf); want = torch.einsum('tk,tjk->tj', x, a[[0, 1] * 16]); "
            "ok = torch.tensor([[True] * 16, [True] * 5 + [False] * 11])[[0, 1] * 16]; "
            "seq = ((buf[0] + buf[1]) + buf[2]) + buf[3]; "
            "print(buf.shape[0], out.shape[0], torch.allclose(out[0][ok], want[ok], rtol=1e-4, atol=1e-3), "
            "torch.equal(out[0][ok], seq[ok]))")  # unwritten cells hold garbage (never read)
    full = dict(os.environ, TRITON_INTERPRET="1", LORAMUX_KERNEL_BACKEND="")
    full.pop("LORAMUX_LORA_REDUCE_PARTIALS", None)
    p = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)
    assert p.stdout.split() == ["5", "1", "True", "True"], p.stdout + p.stderr[-3000:]  # 4 partials + their sum
    tests = os.path.dirname(__file__)
    env = {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": "", "LORAMUX_LORA_REDUCE_PARTIALS": "0"}
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and split_k", env)
    run_triton_cases(os.path.join(tests, "test_lora_kernels.py"), "triton and split_k", env)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton; in-process when already interpreted")
def test_tiles_slow_knob():
    """LORAMUX_LORA_TILES_SLOW=1 puts the token-tile axis last in the shrink / expand / fused-expand grids (only the
    dispatch order changes): every kernel stays correct, the fused expands stay bit-equal to the unfused chain."""
    import os

    tests = os.path.dirname(__file__)
    env = {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_OPS_BACKEND": "", "LORAMUX_LORA_TILES_SLOW": "1"}
    run_triton_cases(os.path.join(tests, "test_lora_kernels.py"), "triton and (shrink_then_expand or expand)", env)
    run_triton_cases(os.path.join(tests, "test_lora_mlp.py"), "triton and (split_k or mixed)", env)
    run_triton_cases(os.path.join(tests, "test_lora_qkv.py"), "triton", env)
