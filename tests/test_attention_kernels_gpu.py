"""GPU tests of Triton paged attention at Llama-3-8B shapes vs the torch reference, incl. CUDA-graph decode and
CUDA-graph mixed prefill/decode through the work-table launch."""
from __future__ import annotations

import itertools

import pytest
import torch

from test_lora_kernels_gpu import capture
from loramux.kernels.attention import (paged_attention, paged_attention_reference, paged_attention_table,
                                       prefill_table_block_m, prefill_table_capacity, prefill_work_table, write_kv,
                                       write_kv_reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BS = 16
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make(seqs, H=32, Hkv=8, D=128, dtype=torch.bfloat16, seed=0, width=None, num_blocks=None):
    """seqs: (cached context, new tokens) per sequence. K/V scattered through a random block permutation of
    num_blocks (default: 3 spare; free rows hold junk 100.0); block tables [B, width] padded with a junk block;
    q [T, H, D]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lens = [c + n for c, n in seqs]
    nblk = [-(-L // BS) for L in lens]
    NB = num_blocks or sum(nblk) + 3
    perm = torch.randperm(NB, generator=g, device="cuda").to(torch.int32)
    width = width or max(nblk)
    tables = torch.full((len(seqs), width), int(perm[-1]), dtype=torch.int32, device="cuda")
    k_cache = torch.full((NB, BS, Hkv, D), 100.0, dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, 100.0)
    i = 0
    for b, L in enumerate(lens):
        blocks = perm[i:i + nblk[b]]
        i += nblk[b]
        tables[b, :nblk[b]] = blocks
        pos = torch.arange(L, device="cuda")
        slots = blocks[pos // BS].long() * BS + pos % BS
        k = torch.randn(L, Hkv, D, generator=g, device="cuda").to(dtype)
        v = torch.randn(L, Hkv, D, generator=g, device="cuda").to(dtype)
        write_kv_reference(k, v, k_cache, v_cache, slots)
    q = torch.randn(sum(n for _, n in seqs), H, D, generator=g, device="cuda").to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                seq_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"), seq_lens_list=lens,
                query_lens=[n for _, n in seqs], scale=D ** -0.5)


def run(c, backend, window=None, **kw):
    fn = paged_attention_reference if backend == "ref" else paged_attention
    extra = {} if backend == "ref" else dict(backend=backend, **kw)
    return fn(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["seq_lens_list"],
              c["query_lens"], c["scale"], window, **extra)


def check(out, ref):
    assert out.dtype == ref.dtype and not out.isnan().any()
    err = (out.double() - ref.double()).norm() / ref.double().norm()
    assert err < TOL[out.dtype], f"relative error {err:.3g} >= {TOL[out.dtype]}"


def rand_lens(B, hi, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, hi + 1, (B,), generator=g).tolist()
    lens[0] = hi
    return lens


@pytest.mark.parametrize("B,hi", [(1, 8192), (7, 3000), (64, 8192), (64, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_real_shapes(B, hi, dtype):
    c = make([(L - 1, 1) for L in rand_lens(B, hi, B + hi)], dtype=dtype, seed=B)
    out = run(c, "triton")
    check(out, run(c, "ref"))
    assert torch.equal(out, run(c, "triton")), "decode not run-to-run bitwise equal"


@pytest.mark.parametrize("splits", [1, 5, 64])
def test_decode_split_counts(splits):
    c = make([(L - 1, 1) for L in rand_lens(9, 5000, 3)], seed=4)
    check(run(c, "triton", num_kv_splits=splits), run(c, "ref"))


@pytest.mark.parametrize("seqs", [[(0, 2048)], [(0, 1000), (4096, 512), (100, 1), (8000, 1), (1000, 300)],
                                  [(16 * i + 3, 17) for i in range(40)]], ids=["prompt", "mixed", "many_chunks"])
@pytest.mark.parametrize("heads", [(32, 8, 128), (16, 16, 64), (32, 4, 64)], ids=["gqa4_d128", "mha_d64", "gqa8_d64"])
def test_prefill_and_mixed_real_shapes(seqs, heads):
    c = make(seqs, *heads, seed=len(seqs))
    out = run(c, "triton")
    check(out, run(c, "ref"))
    assert torch.equal(out, run(c, "triton"))


@pytest.mark.parametrize("seqs", [[(L - 1, 1) for L in (8192, 4000, 4097, 5)], [(6000, 700), (0, 4100), (9, 1)]],
                         ids=["decode", "mixed"])
def test_sliding_window(seqs):
    c = make(seqs, seed=9)
    check(run(c, "triton", window=4096), run(c, "ref", window=4096))


def test_fp32_exact_dots():
    c = make([(300, 1), (17, 1)], dtype=torch.float32, seed=1)
    check(run(c, "triton"), run(c, "ref"))
    c = make([(300, 40), (0, 33)], dtype=torch.float32, seed=2)
    check(run(c, "triton"), run(c, "ref"))


def test_write_kv_matches_index_copy():
    g = torch.Generator(device="cuda").manual_seed(0)
    NB, Hkv, D, T = 64, 8, 128, 300
    kv = torch.randn(T, 3, Hkv, D, generator=g, device="cuda").to(torch.bfloat16)
    slots = torch.randperm(NB * BS, generator=g, device="cuda")[:T]
    caches = [torch.zeros(NB, BS, Hkv, D, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    write_kv(kv[:, 1], kv[:, 2], caches[0], caches[1], slots, backend="triton")
    write_kv_reference(kv[:, 1], kv[:, 2], caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("B", [1, 32])
def test_cuda_graph_decode_matches_eager(B):
    """write_kv + decode captured once with static buffers (fixed-width block tables), replayed on new steps."""
    H, Hkv, D, max_blocks = 32, 8, 128, 256  # up to 4096 tokens per sequence
    c = make([(L + 2, 1) for L in rand_lens(B, 4000, 11)], seed=12, width=max_blocks)  # room for 3 steps
    static = dict(q=torch.zeros(B, H, D, dtype=torch.bfloat16, device="cuda"),
                  k=torch.zeros(B, Hkv, D, dtype=torch.bfloat16, device="cuda"),
                  v=torch.zeros(B, Hkv, D, dtype=torch.bfloat16, device="cuda"),
                  slots=torch.full((B,), -1, dtype=torch.int64, device="cuda"),
                  tables=torch.zeros(B, max_blocks, dtype=torch.int32, device="cuda"),
                  seq_lens=torch.ones(B, dtype=torch.int32, device="cuda"))

    def step(s):
        write_kv(s["k"], s["v"], c["k_cache"], c["v_cache"], s["slots"], backend="triton")
        return paged_attention(s["q"], c["k_cache"], c["v_cache"], s["tables"], s["seq_lens"], [1] * B, [1] * B,
                               c["scale"], backend="triton")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(static)  # warm-up: compile outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(static)
    g = torch.Generator(device="cuda").manual_seed(5)
    for it in range(3):  # each replay appends one token per sequence at its current end
        lens = c["seq_lens"] - 3 + it
        pos = (lens - 1).long()
        blocks = c["block_tables"].gather(1, (pos // BS).view(-1, 1)).view(-1).long()
        new = dict(q=torch.randn(B, H, D, generator=g, device="cuda").to(torch.bfloat16),
                   k=torch.randn(B, Hkv, D, generator=g, device="cuda").to(torch.bfloat16),
                   v=torch.randn(B, Hkv, D, generator=g, device="cuda").to(torch.bfloat16),
                   slots=blocks * BS + pos % BS, tables=c["block_tables"], seq_lens=lens.to(torch.int32))
        for k, t in new.items():
            static[k].copy_(t)
        graph.replay()
        replayed = out_static.clone()
        eager = step(new)  # rewrites the same K/V rows, then attends: must be bitwise the graph's result
        assert torch.equal(replayed, eager), f"graph replay {it} differs from eager"
        lens_list = lens.tolist()
        ref = paged_attention_reference(new["q"], c["k_cache"], c["v_cache"], new["tables"], new["seq_lens"],
                                        lens_list, [1] * B, c["scale"])
        check(replayed, ref)


MIXES = [[(0, 300), (1000, 100), (50, 1), (4000, 1), (17, 60)],  # (cached context, new tokens) per sequence
         [(100 * i + 7, 1) for i in range(16)],  # decode rows only, all 16 sequence slots
         [(0, 512)],  # one prompt filling the bucket
         [(4500, 200), (10, 37), (2000, 1), (0, 1), (600, 255), (33, 18)],  # 512 tokens
         [(16 * i + 3, 17) for i in range(16)]]  # many chunks


@pytest.mark.parametrize("window", [None, 1000])
def test_cuda_graph_mixed_prefill_table(window):
    """paged_attention_table captured once for a bucket (512 tokens, 16 sequences), then replayed on mixes of
    prompts, chunks and decode rows copied into its static buffers (cache, q, block tables, seq_lens, cu_q, work
    table); each replay matches the reference and an eager run, and leaves the padding output rows untouched."""
    H, Hkv, D, max_tokens, max_seqs, width = 32, 8, 128, 512, 16, 320  # width: up to 5120 keys per sequence
    G, dev = H // Hkv, "cuda"
    bm = prefill_table_block_m(H, Hkv, D)
    cap = prefill_table_capacity(max_tokens, max_seqs, G, bm)
    NB = max(sum(-(-(c + n) // BS) for c, n in m) for m in MIXES) + 3
    kc = torch.zeros(NB, BS, Hkv, D, dtype=torch.bfloat16, device=dev)
    vc = torch.zeros_like(kc)
    q = torch.zeros(max_tokens, H, D, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(q)
    tables = torch.zeros(max_seqs, width, dtype=torch.int32, device=dev)
    seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=dev)
    cu_q = torch.zeros(max_seqs + 1, dtype=torch.int32, device=dev)
    work = torch.full((cap, 2), -1, dtype=torch.int32, device=dev)  # all padding while warming up / capturing
    scale = D ** -0.5

    def step(o=out):
        return paged_attention_table(q, kc, vc, tables, seq_lens, cu_q, work, scale, window, backend="triton", out=o)

    graph = capture(step)
    for i, seqs in enumerate(MIXES):
        c = make(seqs, seed=30 + i, width=width, num_blocks=NB)
        B, T = len(seqs), c["q"].shape[0]
        kc.copy_(c["k_cache"])
        vc.copy_(c["v_cache"])
        q.normal_()  # padding rows past T hold junk
        q[:T] = c["q"]
        tables.zero_()
        tables[:B] = c["block_tables"]
        seq_lens.zero_()
        seq_lens[:B] = c["seq_lens"]
        cu = list(itertools.accumulate([0, *c["query_lens"]]))
        cu_q.copy_(torch.tensor(cu + [T] * (max_seqs - B), dtype=torch.int32))
        work.copy_(prefill_work_table(c["query_lens"], G, bm, cap))
        out.fill_(float("nan"))
        graph.replay()
        assert out[T:].isnan().all(), f"replay {i} wrote a padding row"
        check(out[:T], run(c, "ref", window))
        eager = step(torch.full_like(out, float("nan")))
        assert torch.equal(out[:T], eager[:T]), f"graph replay {i} differs from eager"
