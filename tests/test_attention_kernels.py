"""CPU tests of paged attention: torch reference and Triton (TRITON_INTERPRET=1, subprocess) vs dense attention."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from triton_interp import run_triton_cases
from loramux.kernels.attention import (paged_attention, paged_attention_reference, resolve_backend, write_kv,
                                       write_kv_reference)

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton cases run in-process only when this interpreter started with TRITON_INTERPRET=1 (read when kernels are
# decorated); otherwise test_triton_interpreter_suite re-runs them in a subprocess, so the env var never leaks.
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and INTERPRET else [])
BS = 16
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# (cached context, new tokens) per sequence
CASES = {
    "decode": [(0, 1), (16, 1), (39, 1), (70, 1)],
    "prefill": [(0, 5), (0, 21)],
    "chunked": [(16, 8), (33, 12), (5, 3)],
    "mixed": [(40, 1), (0, 9), (21, 7), (4, 1)],
}


def make_case(seqs, H, Hkv, D, dtype=torch.float32, seed=0, spare_blocks=5, extra_cols=2):
    """Random K/V per sequence scattered into random, non-contiguous cache blocks (unused rows hold junk 100.0, so
    any read past a sequence or through a padding block-table entry shows);
    block tables padded with extra columns; q for each sequence's last new tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in seqs]
    nblk = [-(-L // BS) for L in lens]
    NB = sum(nblk) + spare_blocks
    perm = torch.randperm(NB, generator=g).tolist()
    MB = max(nblk) + extra_cols
    tables = torch.zeros(len(seqs), MB, dtype=torch.int32)
    k_cache = torch.full((NB, BS, Hkv, D), 100.0, dtype=dtype)
    v_cache = torch.full((NB, BS, Hkv, D), 100.0, dtype=dtype)
    ks, vs, i = [], [], 0
    for b, L in enumerate(lens):
        blocks = perm[i:i + nblk[b]]
        i += nblk[b]
        tables[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        tables[b, len(blocks):] = torch.tensor(perm[-1])  # padding points at a real (junk) block
        k, v = torch.randn(L, Hkv, D, generator=g).to(dtype), torch.randn(L, Hkv, D, generator=g).to(dtype)
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(L)])
        write_kv_reference(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
    T = sum(n for _, n in seqs)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables, seq_lens=torch.tensor(lens, dtype=torch.int32),
                seq_lens_list=lens, query_lens=[n for _, n in seqs], scale=D ** -0.5, ks=ks, vs=vs)


def naive(c, window=None):
    """fp64 dense causal attention per sequence from the unpaged K/V."""
    out, start = [], 0
    H, Hkv = c["q"].shape[1], c["ks"][0].shape[1]
    for L, n, k, v in zip(c["seq_lens_list"], c["query_lens"], c["ks"], c["vs"]):
        q = c["q"][start:start + n].double().transpose(0, 1)  # [H, n, D]
        k = k.double().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)  # [H, L, D]
        v = v.double().repeat_interleave(H // Hkv, dim=1).transpose(0, 1)
        qp, kp = torch.arange(L - n, L)[:, None], torch.arange(L)[None, :]
        ok = (kp <= qp) & ((kp > qp - window) if window else True)
        s = (q @ k.transpose(1, 2) * c["scale"]).masked_fill(~ok, float("-inf"))
        out.append((s.softmax(-1) @ v).transpose(0, 1))
        start += n
    return torch.cat(out)


def run(c, backend, window=None, **kw):
    return paged_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["seq_lens_list"],
                           c["query_lens"], c["scale"], window, backend=backend, **kw)


def check(out, ref, dtype):
    assert out.dtype == dtype and not out.isnan().any()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 2)], ids=["gqa1", "gqa2", "gqa4"])
def test_matches_dense(backend, case, heads):
    c = make_case(CASES[case], *heads, D=32, seed=len(case) * 7 + heads[0] + heads[1])
    out = run(c, backend)
    ref = naive(c)
    check(out, ref, torch.float32)
    if backend == "triton":  # also against the torch reference path
        check(out, paged_attention_reference(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"],
                                             c["seq_lens_list"], c["query_lens"], c["scale"]).double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["decode", "chunked", "mixed"])
@pytest.mark.parametrize("window", [1, 20])
def test_sliding_window(backend, case, window):
    c = make_case(CASES[case], 4, 2, D=32, seed=window)
    check(run(c, backend, window), naive(c, window), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [64, 128])
def test_head_dims(backend, D):
    c = make_case(CASES["mixed"], 4, 1, D=D, seed=D)
    check(run(c, backend), naive(c), torch.float32)
    c = make_case(CASES["decode"], 4, 1, D=D, seed=D + 1)
    check(run(c, backend), naive(c), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision(backend, dtype):
    for case in ("decode", "mixed"):
        c = make_case(CASES[case], 4, 2, D=32, dtype=dtype, seed=3)
        check(run(c, backend), naive(c), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_q_and_long_context(backend):
    c = make_case([(150, 1), (3, 1), (97, 1)], 4, 2, D=32, seed=11)
    qkv = torch.randn(c["q"].shape[0], 8, 32)
    qkv[:, :4] = c["q"]
    c["q"] = qkv[:, :4]  # non-contiguous view, as split from a packed qkv projection
    check(run(c, backend), naive(c), torch.float32)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (see test_triton_interpreter_suite)")
@pytest.mark.parametrize("window", [None, 24])
def test_triton_decode_splits_deterministic(window):
    c = make_case([(150, 1), (3, 1), (64, 1)], 8, 2, D=32, seed=5)
    ref = naive(c, window)
    for s in (1, 3, 12):  # 12: more splits than a short sequence has key tiles (empty splits)
        out = run(c, "triton", window, num_kv_splits=s)
        check(out, ref, torch.float32)
    assert torch.equal(out, run(c, "triton", window, num_kv_splits=12)), "split-K decode not run-to-run equal"


@pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs TRITON_INTERPRET=1 (see test_triton_interpreter_suite)")
def test_triton_write_kv():
    g = torch.Generator().manual_seed(1)
    NB, Hkv, D, T = 6, 2, 32, 11
    k_cache = torch.randn(NB, BS, Hkv, D, generator=g)
    v_cache = torch.randn(NB, BS, Hkv, D, generator=g)
    kv = torch.randn(T, 3, Hkv, D, generator=g)  # strided k / v views of a packed tensor
    k, v = kv[:, 0], kv[:, 2]
    slots = torch.randperm(NB * BS, generator=g)[:T]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, ref_k, ref_v, slots)
    write_kv(k, v, k_cache, v_cache, slots, backend="triton")
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    pad = slots.clone()
    pad[3] = -1  # padding row: skipped
    before = k_cache.clone()
    write_kv(k * 2, v * 2, k_cache, v_cache, pad, backend="triton")
    changed = (k_cache != before).any(-1).any(-1).view(-1).nonzero().view(-1)
    assert sorted(changed.tolist()) == sorted(slots[pad >= 0].tolist())


def test_write_kv_torch_matches_manual():
    c = make_case(CASES["chunked"], 4, 2, D=32, seed=2)
    for b, L in enumerate(c["seq_lens_list"]):
        for p in (0, L - 1):
            blk = int(c["block_tables"][b, p // BS])
            assert torch.equal(c["k_cache"][blk, p % BS], c["ks"][b][p])
            assert torch.equal(c["v_cache"][blk, p % BS], c["vs"][b][p])


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("LORAMUX_ATTENTION_BACKEND", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv("LORAMUX_ATTENTION_BACKEND", "torch")
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError):
        resolve_backend("cuda-magic", "cpu")
    monkeypatch.setenv("LORAMUX_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError):
        resolve_backend("auto", "cpu")
    if HAS_TRITON and not INTERPRET:
        monkeypatch.setenv("LORAMUX_ATTENTION_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve_backend("auto", "cpu")


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or Triton cases already run in-process")
def test_triton_interpreter_suite():
    """Re-runs every Triton case of this file under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_triton_cases(__file__, "triton", {"LORAMUX_ATTENTION_BACKEND": ""})
