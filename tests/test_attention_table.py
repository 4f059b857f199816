"""CPU tests of the capturable (work-table) prefill: host builder, capacity bound, and paged_attention_table on
padded random prefill/decode mixes, torch path and Triton (TRITON_INTERPRET=1, subprocess) vs the reference."""
from __future__ import annotations

import importlib.util
import itertools
import os
import random

import pytest
import torch

from test_attention_kernels import check, make_case
from triton_interp import run_triton_cases
from loramux.kernels.attention import (paged_attention_reference, paged_attention_table, prefill_table_block_m,
                                       prefill_table_capacity, prefill_work_table)

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and INTERPRET else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the table helpers live in the Triton module")


def cdiv(a, b):
    return -(-a // b)


def random_mix(rng: random.Random, max_seqs: int = 4) -> list[tuple[int, int]]:
    """(cached context, new tokens) for 2..max_seqs sequences: decode rows (1 token) mixed with prompts and
    chunks (2..19 tokens after 0..40 cached ones), at least one of each."""
    seqs = [(rng.randint(0, 50), 1) if rng.random() < 0.4 else (rng.choice([0, rng.randint(1, 40)]), rng.randint(2, 19))
            for _ in range(rng.randint(2, max_seqs))]
    seqs[0] = (rng.randint(1, 50), 1)
    seqs[-1] = (rng.randint(0, 30), rng.randint(2, 19))
    rng.shuffle(seqs)
    return seqs


def padded_inputs(c, rng: random.Random, extra_q: int, extra_seqs: int, group: int, block_m: int, capacity=None,
                  shuffle=False):
    """Static-buffer style inputs: q with extra_q padding rows, block_tables / seq_lens / cu_q with extra_seqs
    padding rows that look like real sequences owning the padding q rows (so any read of them shows up in the
    padding output rows), and a work table of capacity (default: 2 over the padded sizes' bound), optionally
    with its rows shuffled (padding entries anywhere)."""
    qlens, T, B = c["query_lens"], c["q"].shape[0], len(c["query_lens"])
    H, D = c["q"].shape[1:]
    q = torch.cat([c["q"], torch.randn(extra_q, H, D).to(c["q"].dtype)])
    tables = torch.cat([c["block_tables"], c["block_tables"][-1:].expand(extra_seqs, -1)])
    pad_lens = [rng.randint(0, extra_q) for _ in range(extra_seqs)]
    cu = list(itertools.accumulate([0, *qlens, *pad_lens]))
    cu = [min(x, T + extra_q) for x in cu]
    seq_lens = torch.tensor(c["seq_lens_list"] + [n + 3 for n in pad_lens], dtype=torch.int32)
    cap = capacity or prefill_table_capacity(T + extra_q, B + extra_seqs, group, block_m) + 2
    work = prefill_work_table(qlens, group, block_m, cap)
    if shuffle:
        work = work[torch.randperm(cap, generator=torch.Generator().manual_seed(rng.randint(0, 99)))].contiguous()
    return dict(q=q, tables=tables, seq_lens=seq_lens, cu_q=torch.tensor(cu, dtype=torch.int32), work=work)


def run_table(c, p, backend, window):
    out = torch.full_like(p["q"], float("nan"))  # poison: unwritten real rows fail, padding rows must stay NaN
    res = paged_attention_table(p["q"], c["k_cache"], c["v_cache"], p["tables"], p["seq_lens"], p["cu_q"], p["work"],
                                c["scale"], window, backend=backend, out=out,
                                query_lens=c["query_lens"] if backend == "torch" else None)
    assert res is out
    T = c["q"].shape[0]
    assert out[T:].isnan().all(), "a padding q row was written"
    ref = paged_attention_reference(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"],
                                    c["seq_lens_list"], c["query_lens"], c["scale"], window)
    check(out[:T], ref.double(), c["q"].dtype)
    return out[:T]


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (8, 2)], ids=["gqa1", "gqa2", "gqa4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [None, 9])
def test_table_matches_reference(backend, heads, dtype, window):
    rng = random.Random(heads[0] * 100 + (dtype == torch.bfloat16) * 10 + bool(window))
    bm = prefill_table_block_m(*heads, 64)  # 16 in the interpreter; the torch path ignores the table
    for i in range(3):  # fresh mixes and inputs each time
        c = make_case(random_mix(rng, 6), *heads, D=64, dtype=dtype, seed=rng.randint(0, 10 ** 6))
        p = padded_inputs(c, rng, extra_q=rng.randint(1, 7), extra_seqs=rng.randint(0, 2),
                          group=heads[0] // heads[1], block_m=bm, shuffle=i > 0)
        assert (p["work"][:, 0] < 0).any(), "case should exercise padding entries"
        run_table(c, p, backend, window)


@needs_triton
@pytest.mark.parametrize("backend", BACKENDS)
def test_table_non_pow2_head_dim_exact_capacity(backend):
    rng = random.Random(7)
    c = make_case([(20, 1), (0, 13), (33, 6)], 4, 2, D=48, seed=7)
    bm = prefill_table_block_m(4, 2, 48)
    need = sum(cdiv(n * 2, bm) for n in c["query_lens"])
    p = padded_inputs(c, rng, extra_q=3, extra_seqs=1, group=2, block_m=bm, capacity=need)
    assert (p["work"][:, 0] >= 0).all()
    run_table(c, p, backend, None)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (see test_triton_interpreter_suite)")
def test_triton_table_equals_eager_prefill():
    """Same tiles as the eager launch (BLOCK_M 16 in the interpreter), so bitwise the same result."""
    from loramux.kernels.attention import paged_attention

    rng = random.Random(3)
    c = make_case(random_mix(rng, 5), 8, 2, D=64, seed=3)
    p = padded_inputs(c, rng, extra_q=2, extra_seqs=1, group=4, block_m=16, shuffle=True)
    eager = paged_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["seq_lens_list"],
                            c["query_lens"], c["scale"], 5, backend="triton")
    assert torch.equal(run_table(c, p, "triton", 5), eager)


@needs_triton
def test_work_table_format():
    work = prefill_work_table([3, 0, 17, 1], group=2, block_m=16, capacity=7)
    assert work.dtype == torch.int32 and work.shape == (7, 2) and work.device.type == "cpu"
    assert work.tolist() == [[0, 0], [2, 0], [2, 1], [2, 2], [3, 0], [-1, -1], [-1, -1]]
    assert (prefill_work_table([], 4, 16, 3) == -1).all()
    packed = torch.full((20,), 7, dtype=torch.int32)  # in place, into a slice of a packed step buffer
    res = prefill_work_table([3, 0, 17, 1], 2, 16, 7, out=packed[3:17])
    assert res.data_ptr() == packed[3:].data_ptr() and torch.equal(res, work)
    assert packed[:3].tolist() == [7] * 3 and packed[17:].tolist() == [7] * 3
    with pytest.raises(ValueError, match="elements"):
        prefill_work_table([1], 2, 16, 7, out=packed[:12])


@needs_triton
def test_work_table_refuses_over_capacity():
    assert prefill_work_table([3, 0, 17, 1], 2, 16, capacity=5)[-1].tolist() == [3, 0]  # exactly full
    with pytest.raises(ValueError, match="capacity"):
        prefill_work_table([3, 0, 17, 1], 2, 16, capacity=4)
    with pytest.raises(ValueError, match="capacity"):
        prefill_work_table([1] * 9, 4, 64, capacity=8)  # 9 decode rows: one tile each
    with pytest.raises(ValueError):
        prefill_work_table([4, -1], 1, 16, capacity=8)


@needs_triton
def test_capacity_bound_over_random_splits():
    rng = random.Random(0)
    for _ in range(3000):
        G, bm = rng.choice([1, 2, 4, 8]), rng.choice([16, 32, 64, 128])
        max_tokens, max_seqs = rng.randint(1, 700), rng.randint(1, 80)
        cap = prefill_table_capacity(max_tokens, max_seqs, G, bm)
        assert cap <= cdiv(max_tokens * G, bm) + max_seqs
        T = rng.randint(1, max_tokens)
        B = rng.randint(1, min(max_seqs, T))
        if rng.random() < 0.5:  # adversarial: B - 1 single tokens, the rest one long sequence
            lens = [1] * (B - 1) + [T - B + 1]
        else:  # uniform random composition of T into B positive parts
            cuts = sorted(rng.sample(range(1, T), B - 1)) if B > 1 else []
            lens = [b - a for a, b in zip([0, *cuts], [*cuts, T])]
        work = prefill_work_table(lens, G, bm, cap)  # must not raise
        assert int((work[:, 0] >= 0).sum()) == sum(cdiv(n * G, bm) for n in lens)
    # the bound is attained: 3 decode rows + 97 tokens at G=1, BLOCK_M=16 need 7 + 3 tiles
    assert prefill_table_capacity(100, 4, 1, 16) == 10 == sum(cdiv(n, 16) for n in (97, 1, 1, 1))
    for T, B in itertools.product(range(1, 13), range(1, 6)):  # exhaustive on small sizes, BLOCK_M 8, G 3
        worst = max(sum(cdiv(n * 3, 8) for n in lens) for lens in partitions(T, B))
        assert worst <= prefill_table_capacity(T, B, 3, 8)


def partitions(total: int, parts: int, top: int | None = None):
    """Non-increasing tuples of at most `parts` positive ints summing to at most `total`."""
    top = total if top is None else top
    yield ()
    if parts:
        for n in range(1, min(top, total) + 1):
            for rest in partitions(total - n, parts - 1, n):
                yield (n, *rest)


@needs_triton
def test_table_launch_rejects_bad_tables():
    from loramux.kernels.attention_prefill_triton import prefill_graphed

    c = make_case([(3, 2)], 4, 2, D=32)
    cu_q = torch.tensor([0, 2], dtype=torch.int32)
    args = (c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], cu_q)
    with pytest.raises(ValueError, match="int32"):
        prefill_graphed(*args, torch.zeros(4, 2, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="int32"):
        prefill_graphed(*args, torch.zeros(8, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="backend 'torch' needs"):
        paged_attention_table(*args, torch.zeros(4, 2, dtype=torch.int32), 1.0, backend="torch")


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="triton missing, or Triton cases already run in-process")
def test_triton_interpreter_suite():
    """Re-runs every Triton case of this file under TRITON_INTERPRET=1 in a fresh interpreter."""
    run_triton_cases(__file__, "triton", {"LORAMUX_ATTENTION_BACKEND": ""})
