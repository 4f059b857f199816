"""CPU tests of the fused single-launch LoRA kernel (kernels/lora_fused_triton.py): cases under TRITON_INTERPRET=1
in a subprocess (vs the fp64 reference and vs the two-launch path), host-side dispatch / grid / launch-key checks."""
from __future__ import annotations

import os

import pytest
import torch

from test_lora_kernels import check_y, naive_add, nan_padded_stacks
from triton_interp import run_triton_cases

tri = pytest.importorskip("loramux.kernels.lora_triton")  # imports triton (launch plans are host math)
from loramux.kernels import lora_fused_triton as fused_mod  # noqa: E402
from loramux.kernels.lora import LoRAMeta, add_lora, build_lora_meta  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (test_interpreter_suite)")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (T, D distinct adapters, slice widths, R, rank choices, dtype, K). Widths unequal and not multiples of 16;
# 600 > the 512-column chunk (two chunks in one slice); K not a multiple of the K tile (masked tail, several tiles).
CASES = [
    (1, 1, (40,), 16, (1, 4, 8, 16), F32, 48),
    (1, 1, (96, 32, 32), 64, (64,), BF16, 96),
    (2, 2, (72, 24), 8, (1, 8), F16, 40),
    (5, 3, (96, 32, 32), 16, (0, 1, 4, 16), BF16, 160),
    (9, 8, (40,), 64, (1, 4, 8, 16, 64), F16, 72),
    (16, 4, (72, 24), 64, (0, 4, 16, 64), F32, 300),
    (17, 8, (96, 32, 32), 16, (1, 4, 8, 16), F32, 64),
    (23, 5, (600, 40), 8, (0, 4, 8), BF16, 32),
    (33, 6, (40,), 16, (0, 1, 16), BF16, 200),
    (40, 8, (96, 32, 32), 64, (0, 1, 4, 8, 16, 64), F16, 56),
    (48, 2, (72, 24), 16, (4, 16), BF16, 130),
    (64, 8, (96, 32, 32), 64, (1, 4, 8, 16, 64), BF16, 80),
    (64, 1, (40,), 4, (4,), F16, 24),
    (20, 3, (24, 40, 16), 128, (0, 1, 65, 100, 128), F32, 48),  # R > 64: rank tiles h0, h1; tile 1 skipped < 65
    (12, 4, (56, 24, 24), 128, (0, 3, 64, 128), BF16, 40),
    (7, 3, (48, 16, 16, 32), 256, (0, 8, 130, 256), F32, 32),  # 4 slices, 4 rank tiles
]


def make(T, D, widths, R, choices, dtype, K, seed):
    """Fresh random case: D distinct adapters among S slots, ~20% tokens without adapter (-1), ranks drawn from
    choices (0 = slice not targeted), A/B padding past each rank NaN, y0 random (unwritten / double-written
    elements show against the reference). Same dict layout as test_lora_kernels.make_case."""
    g = torch.Generator().manual_seed(seed)
    S = D + 1 + seed % 3  # some slots hold adapters no token uses
    L, N = len(widths), sum(widths)
    offs = tuple(int(v) for v in torch.tensor([0, *widths]).cumsum(0))
    adapters = torch.randperm(S, generator=g)[:D].to(torch.int32)
    slots = adapters[torch.randint(D, (T,), generator=g)]
    slots = torch.where(torch.rand(T, generator=g) < 0.2, -1, slots).to(torch.int32)
    ch = torch.tensor(choices)
    ranks = ch[torch.randint(len(ch), (S, L), generator=g)].to(torch.int32)
    ranks[adapters[0], 0] = max(choices)
    A, B, scales = nan_padded_stacks(ranks, K, offs, R, dtype, g)
    x = torch.randn(T, K, generator=g).to(dtype)
    y0 = (0.1 * torch.randn(T, N, generator=g)).to(dtype)
    return dict(x=x, y0=y0, A=A, B=B, ranks=ranks, scales=scales, offs=offs, slots=slots, S=S, R=R)


def run(c, fused, pad=(0, 0), seed=0, **kw):
    """add_lora on the Triton backend into a y that is a column view of a wider random buffer (row stride != N);
    -> (y view, left margin, right margin, their values before)."""
    T, N = c["y0"].shape
    lo, hi = pad
    big = torch.randn(T, lo + N + hi, generator=torch.Generator().manual_seed(seed)).to(c["y0"].dtype)
    big[:, lo:lo + N] = c["y0"]
    before = big.clone()
    meta = build_lora_meta(c["slots"], c["S"])
    add_lora(big[:, lo:lo + N], c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend="triton",
             fused=fused, **kw)
    margins = torch.cat([big[:, :lo], big[:, lo + N:]], 1)
    assert torch.equal(margins, torch.cat([before[:, :lo], before[:, lo + N:]], 1)), "wrote outside y"
    return big[:, lo:lo + N]


def close_to(a, b, dtype):
    """Elementwise: the two paths differ only by fp32 summation order, i.e. <= 2 output ulps (fp32: 1e-5)."""
    r = 1e-5 if dtype == F32 else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(a.float(), b.float(), rtol=r, atol=r * b.float().abs().max().item())


@interp_only
@pytest.mark.parametrize("i", range(len(CASES)))
def test_interp_fused_matches_reference_and_two_launch(i):
    T, D, widths, R, choices, dtype, K = CASES[i]
    c = make(T, D, widths, R, choices, dtype, K, seed=1000 + i)
    if i % 2:  # x as a column view of a wider buffer too
        xb = torch.randn(T, K + 5).to(dtype)
        xb[:, 5:] = c["x"]
        c["x"] = xb[:, 5:]
    y = run(c, True, pad=(3, 5), seed=i)
    check_y(y, c, naive_add(c))
    y2 = run(c, False)
    check_y(y2, c, naive_add(c))
    close_to(y, y2, dtype)
    if i % 5 == 0:  # (interpreter time) a few cases: run-to-run bitwise, and the heuristic picks this kernel
        assert torch.equal(y, run(c, True, seed=i + 1)), "fused path not run-to-run deterministic"
        assert torch.equal(y, run(c, None)), "heuristic (T <= FUSED_MAX_T, small R*K) did not pick the fused kernel"


@interp_only
def test_interp_fused_multi_chunk_override():
    """Several column chunks per slice with the chunk override (bf16: 128 columns, fp32: 64): same result."""
    for dtype in (BF16, F32):
        c = make(11, 3, (200, 72, 40), 16, (0, 4, 16), dtype, 64, seed=7)
        meta = build_lora_meta(c["slots"], c["S"])
        ys = []
        for chunk in (None, 64):
            y = c["y0"].clone()
            fused_mod.fused_add_lora(y, c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, chunk)
            ys.append(y)
        check_y(ys[1], c, naive_add(c))
        assert torch.equal(ys[0], ys[1])


@interp_only
def test_interp_fused_no_work_leaves_y_alone():
    c = make(13, 3, (72, 24), 16, (4, 16), BF16, 48, seed=3)
    c["slots"][:] = -1
    assert torch.equal(run(c, True), c["y0"])
    c = make(13, 3, (72, 24), 16, (4, 16), BF16, 48, seed=4)
    c["ranks"][:] = 0
    assert torch.equal(run(c, True), c["y0"])


@interp_only
def test_interp_heuristic_uses_two_launch_past_max_t():
    T = fused_mod.FUSED_MAX_T + 1
    c = make(T, 2, (40,), 16, (4, 16), F32, 32, seed=5)
    y = run(c, None)
    assert torch.equal(y, run(c, False))
    check_y(y, c, naive_add(c))


class _Recorder:
    """Stands in for a jitted kernel: kernel[grid](...) records the grid, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        return lambda *a, **kw: self.grids.append(grid)


@pytest.mark.parametrize("T,S,widths", [(1, 4, (4096, 1024, 1024)), (37, 9, (14336, 14336)), (64, 32, (4096,))])
def test_grid_depends_on_shapes_only(monkeypatch, T, S, widths):
    """Same T, S and shapes -> same grid for any slot assignment (CUDA-graph capturable); chunk count per slice."""
    rec = _Recorder()
    monkeypatch.setattr(fused_mod, "_fused_kernel", rec)
    K, R, L, N = 64, 16, len(widths), sum(widths)
    offs = tuple(int(v) for v in torch.tensor([0, *widths]).cumsum(0))
    a, b = torch.zeros(S, L * R, K), torch.zeros(S, N, R)
    ranks, scales = torch.full((S, L), R, dtype=torch.int32), torch.ones(S, L)
    for slots in (torch.full((T,), -1), torch.zeros(T), torch.arange(T) % S):
        meta = build_lora_meta(slots.to(torch.int32), S)
        tri.add_lora(torch.zeros(T, N), torch.zeros(T, K), a, b, ranks, scales, offs, meta, fused=True)
    chunks = sum(-(-w // fused_mod.FUSED_CHUNK) for w in widths)
    assert rec.grids == [(chunks, -(-T // 16) + min(S, T))] * 3


def test_dispatch_errors():
    c = make(4, 1, (40,), 16, (16,), F32, 32, seed=1)
    meta = build_lora_meta(c["slots"], c["S"])
    args = (c["y0"].clone(), c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta)
    with pytest.raises(ValueError, match="split_k"):
        tri.add_lora(*args, split_k=2, fused=True)
    S, N = c["B"].shape[:2]
    big = (torch.zeros(S, 512, 32), torch.zeros(S, N, 512))  # R = 512 > FUSED_MAX_R
    with pytest.raises(ValueError, match="max rank"):
        tri.add_lora(c["y0"].clone(), c["x"], *big, c["ranks"], c["scales"], c["offs"], meta, fused=True)
    assert not fused_mod.use_fused(4, 32, 512)


def test_launch_key_tracks_the_kernel_variant(monkeypatch):
    """Warm-up (server/runner/warm_up.py) compiles one size per distinct key: the fused variant needs its own key,
    shared by every T it serves (T is not a fused-kernel argument), distinct from the two-launch keys."""
    dev = torch.device("cuda")
    monkeypatch.setattr(fused_mod, "ENABLED", False)  # the default (slower on the H100): never picked
    assert all(tri.launch_key(T, 4096, 3, 16, dev)[-1] != "fused" for T in range(1, fused_mod.FUSED_MAX_T + 1))
    monkeypatch.setattr(fused_mod, "ENABLED", True)
    for K, L, R in ((4096, 3, 16), (4096, 2, 64), (14336, 1, 16)):
        keys = {tri.launch_key(T, K, L, R, dev) for T in range(1, fused_mod.FUSED_MAX_T + 1)}
        assert len(keys) == 1 and next(iter(keys))[-1] == "fused", (K, L, R)
        assert tri.launch_key(fused_mod.FUSED_MAX_T + 1, K, L, R, dev)[-1] != "fused"
    assert tri.launch_key(1, 14336, 1, 64, dev)[-1] != "fused"  # 1.8 MB of A per program: two launches
    assert fused_mod.fused_plan(1, 4096, 16) != fused_mod.fused_plan(1, 4096, 128)


def test_fused_argument_passes_through_torch_backend():
    c = make(6, 2, (40,), 16, (4, 16), F32, 32, seed=2)
    meta = build_lora_meta(c["slots"], c["S"], out=LoRAMeta.empty(8, c["S"], "cpu"))
    y = c["y0"].clone()
    add_lora(y, c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend="torch", fused=True)
    check_y(y, c, naive_add(c))


@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter run")
def test_interpreter_suite():
    """Runs the interp cases above under TRITON_INTERPRET=1 in a fresh interpreter (the variable is read when
    kernels are decorated, so it must not leak into the rest of the session)."""
    run_triton_cases(__file__, "interp and not suite", {"LORAMUX_KERNEL_BACKEND": "", "LORAMUX_FUSED_LORA": "1"},
                     allow_skips=False)  # the heuristic is opt-in; these cases check what it picks when on
