"""CPU tests of the multi-LoRA ops: torch backend in-process, Triton backend under TRITON_INTERPRET=1 (subprocess)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from triton_interp import run_triton_cases
from loramux.kernels.lora import LoRAMeta, add_lora, build_lora_meta, lora_expand, lora_shrink, resolve_backend
from loramux.kernels.lora_layout import b_block, pack_b

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton cases run in-process only when this interpreter was started with TRITON_INTERPRET=1 (the env var is
# read when kernels are decorated); otherwise test_triton_interpreter_suite re-runs them in a subprocess.
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and INTERPRET else [])
# GQA-like unequal widths; a slice wider than one 128-column expand tile; N % 16 != 0
LAYOUTS = {"qkv": (64, 16, 16), "gate_up": (144, 48), "single": (40,)}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def nan_padded_stacks(ranks, K, offs, R, dtype, g):
    """Random A [S, L*R, K] and B stack [S, N, R] (compact blocks, lora_layout.pack_b) whose elements past each
    slot's rank / outside its blocks are NaN (a kernel that reads one fails), and scales [S, L]."""
    S, L = ranks.shape
    A = (torch.randn(S, L * R, K, generator=g) / K ** 0.5).to(dtype)
    B = torch.randn(S, offs[-1], R, generator=g).to(dtype)
    for s in range(S):
        for i in range(L):
            r = int(ranks[s, i])
            A[s, i * R + r:(i + 1) * R] = float("nan")
            B[s, offs[i]:offs[i + 1], r:] = float("nan")
    return A, pack_b(B, ranks, offs, fill=float("nan")), torch.rand(S, L, generator=g) * 1.5 + 0.25


def make_case(T, S=5, K=48, widths=(64, 16, 16), R=16, dtype=torch.float32, seed=0, rank_choices=None):
    """Random inputs; A/B padding beyond each rank is NaN. Ranks include 0 and R; slots unsorted, with -1."""
    g = torch.Generator().manual_seed(seed)
    L, N = len(widths), sum(widths)
    offs = tuple(int(v) for v in torch.tensor([0, *widths]).cumsum(0))
    choices = torch.tensor(rank_choices or [0, 1, 4, 8, R // 2, R])
    ranks = choices[torch.randint(len(choices), (S, L), generator=g)].to(torch.int32)
    ranks[0, 0] = R
    if S > 1:
        ranks[1, -1] = 0
    A, B, scales = nan_padded_stacks(ranks, K, offs, R, dtype, g)
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    x = torch.randn(T, K, generator=g).to(dtype)
    y0 = (0.1 * torch.randn(T, N, generator=g)).to(dtype)  # base output; the LoRA delta is O(1)
    return dict(x=x, y0=y0, A=A, B=B, ranks=ranks, scales=scales, offs=offs, slots=slots, S=S, R=R)


def naive_shrink(c):
    """fp64 per-token reference: h [T, L*R] (NaN where undefined) and the mask of defined entries."""
    T, L, R = c["x"].shape[0], c["ranks"].shape[1], c["R"]
    h = torch.full((T, L * R), float("nan"), dtype=torch.float64)
    for t, s in enumerate(c["slots"].tolist()):
        for i in range(L):
            r = int(c["ranks"][s, i]) if s >= 0 else 0
            if r:
                h[t, i * R:i * R + r] = c["A"][s, i * R:i * R + r].double() @ c["x"][t].double()
    return h, ~h.isnan()


def naive_add(c, h=None):
    """fp64 per-token reference of y after add_lora (h: optional fp64 shrink output to start from)."""
    y = c["y0"].double().clone()
    R, offs = c["R"], c["offs"]
    h = naive_shrink(c)[0] if h is None else h
    for t, s in enumerate(c["slots"].tolist()):
        for i in range(len(offs) - 1):
            r = int(c["ranks"][s, i]) if s >= 0 else 0
            if r:
                b = b_block(c["B"][s], offs[i], offs[i + 1], r).double()
                y[t, offs[i]:offs[i + 1]] += float(c["scales"][s, i]) * (b @ h[t, i * R:i * R + r])
    return y


def untouched(c):
    """[T, N] bool: elements add_lora must leave bit-identical (slot -1 rows, rank-0 slices)."""
    T, N = c["y0"].shape
    m = torch.ones(T, N, dtype=torch.bool)
    for t, s in enumerate(c["slots"].tolist()):
        for i in range(len(c["offs"]) - 1):
            if s >= 0 and int(c["ranks"][s, i]):
                m[t, c["offs"][i]:c["offs"][i + 1]] = False
    return m


def check_y(y, c, ref):
    assert not y.isnan().any(), "NaN leaked from padding"
    keep = untouched(c)
    assert torch.equal(y[keep], c["y0"][keep]), "rows/slices without an adapter were modified"
    # relative to the LoRA delta, beyond the unavoidable rounding of y to its dtype (2x that of round(ref))
    delta = (ref - c["y0"].double()).norm()
    rounding = (ref.to(y.dtype).double() - ref).norm()
    err = ((y.double() - ref).norm() - 2 * rounding).clamp_min(0) / delta.clamp_min(1e-30)
    assert err < TOL[y.dtype], f"relative error {err:.3g} >= {TOL[y.dtype]}"


def run_add(c, backend, **kw):
    y = c["y0"].clone()
    meta = build_lora_meta(c["slots"], c["S"])
    add_lora(y, c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend=backend, **kw)
    return y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_add_lora_matches_reference(backend, dtype, T, layout):
    c = make_case(T, widths=LAYOUTS[layout], dtype=dtype, seed=T * 31 + len(layout))
    check_y(run_add(c, backend), c, naive_add(c))


TILING = {  # R=128: several rank tiles (shrink programs, expand loop); T=300: prefill-like tiles, several K tiles
    "rank_tiles": dict(T=20, S=3, K=32, widths=(24, 40), R=128, rank_choices=[0, 1, 65, 100, 128]),
    "long_segments": dict(T=300, S=3, K=160, widths=(24, 16)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(TILING))
def test_tiling_edge_cases(backend, dtype, case):
    c = make_case(dtype=dtype, seed=7, **TILING[case])
    check_y(run_add(c, backend), c, naive_add(c))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 7, 64])
def test_lora_shrink_then_expand(backend, dtype, T):
    c = make_case(T, dtype=dtype, seed=100 + T)
    meta = build_lora_meta(c["slots"], c["S"])
    out = torch.full((T, c["A"].shape[1]), float("nan"))  # poisoned: undefined cells must stay untouched
    got = lora_shrink(c["x"], c["A"], c["ranks"], meta, out=out, backend=backend)
    assert got is out
    ref, defined = naive_shrink(c)
    assert got[~defined].isnan().all(), "cells beyond the rank / of slot -1 rows were written"
    assert not got[defined].isnan().any()
    err = (got[defined].double() - ref[defined]).norm() / ref[defined].norm().clamp_min(1e-30)
    assert err < 1e-5  # fp32 output; bf16 inputs multiply exactly in fp32
    y = c["y0"].clone()  # the public pair composes to add_lora
    lora_expand(y, got, c["B"], c["ranks"], c["scales"], c["offs"], meta, backend=backend)
    check_y(y, c, naive_add(c))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("layout", ["qkv", "single"])
def test_lora_expand(backend, dtype, T, layout):
    c = make_case(T, widths=LAYOUTS[layout], dtype=dtype, seed=200 + T)
    ref_h, defined = naive_shrink(c)
    g = torch.Generator().manual_seed(T)
    buf = torch.randn(ref_h.shape, generator=g).masked_fill(~defined, float("nan"))  # NaN must not leak
    y = c["y0"].clone()
    meta = build_lora_meta(c["slots"], c["S"])
    lora_expand(y, buf, c["B"], c["ranks"], c["scales"], c["offs"], meta, backend=backend)
    check_y(y, c, naive_add(c, h=buf.double()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_adapter_tokens_and_all_zero_ranks_leave_y_alone(backend):
    c = make_case(12, seed=5)
    c["slots"][:] = -1
    assert torch.equal(run_add(c, backend), c["y0"])
    c = make_case(12, seed=6)
    c["ranks"][:] = 0
    assert torch.equal(run_add(c, backend), c["y0"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_run_to_run_bitwise_equal(backend, dtype):
    c = make_case(33, dtype=dtype, seed=11)
    assert torch.equal(run_add(c, backend), run_add(c, backend))


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (test_triton_interpreter_suite)")
@pytest.mark.parametrize("split_k", [3, 4])
def test_triton_split_k_deterministic_and_correct(split_k):
    # K=64 cut into 2 (asked 3: no empty parts are launched) or 4 partial sums, reduced in a fixed order.
    c = make_case(9, K=64, dtype=torch.bfloat16, seed=13)
    y1 = run_add(c, "triton", split_k=split_k)
    check_y(y1, c, naive_add(c))
    assert torch.equal(y1, run_add(c, "triton", split_k=split_k))


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1")
def test_triton_strided_views():
    # y and x as column slices of wider buffers (row stride != width), as a fused layer output would be.
    c = make_case(10, seed=17)
    T, N = c["y0"].shape
    big_y = torch.zeros(T, N + 8)
    big_y[:, 4:4 + N] = c["y0"]
    big_x = torch.zeros(T, c["x"].shape[1] + 3)
    big_x[:, 3:] = c["x"]
    meta = build_lora_meta(c["slots"], c["S"])
    add_lora(big_y[:, 4:4 + N], big_x[:, 3:], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta,
             backend="triton")
    check_y(big_y[:, 4:4 + N], c, naive_add(c))
    assert not big_y[:, :4].any() and not big_y[:, 4 + N:].any()


def _check_meta(meta, slots, S):
    T = slots.shape[0]
    s = slots.long().tolist()
    seg = meta.seg_start.tolist()
    order = meta.sorted_tokens[:T].tolist()
    assert meta.num_tokens == T and len(seg) == S + 1 and seg[0] == 0
    for k in range(S):
        assert order[seg[k]:seg[k + 1]] == [t for t in range(T) if s[t] == k]  # grouped, stable
    assert order[seg[S]:] == [t for t in range(T) if s[t] < 0]
    assert meta.token_slots[:T].tolist() == s


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda S: st.tuples(st.just(S), st.lists(st.integers(-1, S - 1), max_size=70))))
def test_build_lora_meta_groups_tokens(case):
    S, vals = case
    slots = torch.tensor(vals, dtype=torch.int64)
    _check_meta(build_lora_meta(slots, S), slots, S)


def test_build_lora_meta_into_preallocated_buffers():
    S = 6
    buf = LoRAMeta.empty(128, S, "cpu")
    ptrs = [buf.token_slots.data_ptr(), buf.sorted_tokens.data_ptr(), buf.seg_start.data_ptr()]
    g = torch.Generator().manual_seed(0)
    for T in (100, 7, 1, 0, 64):  # shrinking then growing T: stale tails must not matter
        slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
        got = build_lora_meta(slots, S, out=buf)
        fresh = build_lora_meta(slots, S)
        assert got is buf
        assert [buf.token_slots.data_ptr(), buf.sorted_tokens.data_ptr(), buf.seg_start.data_ptr()] == ptrs
        assert torch.equal(got.seg_start, fresh.seg_start)
        assert torch.equal(got.sorted_tokens[:T], fresh.sorted_tokens[:T])
        _check_meta(got, slots, S)
    with pytest.raises(ValueError):
        build_lora_meta(torch.zeros(129, dtype=torch.int32), S, out=buf)
    with pytest.raises(ValueError):
        build_lora_meta(torch.zeros(4, dtype=torch.int32), S + 1, out=buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_with_preallocated_meta(backend):
    c = make_case(21, seed=19)
    meta = build_lora_meta(c["slots"], c["S"], out=LoRAMeta.empty(64, c["S"], "cpu"))
    y = c["y0"].clone()
    add_lora(y, c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend=backend)
    assert torch.equal(y, run_add(c, backend))


def test_shape_and_dtype_errors():
    c = make_case(4, seed=1)
    meta = build_lora_meta(c["slots"], c["S"])
    args = (c["A"], c["B"], c["ranks"], c["scales"])
    with pytest.raises(TypeError):
        add_lora(c["y0"].clone(), c["x"].bfloat16(), *args, c["offs"], meta, backend="torch")
    with pytest.raises(ValueError):
        add_lora(c["y0"].clone(), c["x"], *args, (0, 64, 80), meta, backend="torch")
    with pytest.raises(ValueError):
        add_lora(c["y0"][:3].clone(), c["x"][:3], *args, c["offs"], meta, backend="torch")


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("LORAMUX_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError):
        resolve_backend("cuda", cpu)
    if HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", cpu)
        assert resolve_backend("triton", torch.device("cuda")) == "triton"
        assert resolve_backend("auto", torch.device("cuda")) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert resolve_backend("triton", cpu) == "triton"
        monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", "triton")
        assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError):
        resolve_backend("auto", cpu)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or Triton cases already run in-process")
def test_triton_interpreter_suite():
    """Re-runs every Triton case of this file under TRITON_INTERPRET=1 in a fresh interpreter, so the env var
    (read when kernels are decorated) never leaks into the rest of the test session."""
    run_triton_cases(__file__, "triton", {"LORAMUX_KERNEL_BACKEND": ""})
