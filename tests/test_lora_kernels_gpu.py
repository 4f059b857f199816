"""GPU tests of the multi-LoRA Triton kernels at Llama-3-8B shapes, incl. CUDA-graph capture of meta + add_lora."""
from __future__ import annotations

import pytest
import torch

from loramux.kernels.lora import LoRAMeta, add_lora, build_lora_meta, lora_expand, lora_shrink
from loramux.kernels.lora_layout import b_block, pack_b

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}
S, R = 32, 64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make(T, group, dtype, seed, r_max=R, rank_choices=(0, 8, 16, 32, 64), slots=None):
    """Random device inputs; A/B padding beyond each (slot, slice) rank is NaN; slots unsorted with -1."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    K, widths = GROUPS[group]
    L, N = len(widths), sum(widths)
    offs = tuple(int(v) for v in torch.tensor([0, *widths]).cumsum(0))
    ch = torch.tensor(rank_choices, device="cuda")
    ranks = ch[torch.randint(len(ch), (S, L), generator=g, device="cuda")].to(torch.int32)
    ranks[0, 0], ranks[1, -1] = r_max, 0
    A = (torch.randn(S, L * r_max, K, generator=g, device="cuda") / K ** 0.5).to(dtype)
    B = torch.randn(S, N, r_max, generator=g, device="cuda").to(dtype)
    j = torch.arange(r_max, device="cuda")
    A.view(S, L, r_max, K).masked_fill_((j[None, None, :] >= ranks[:, :, None])[..., None], float("nan"))
    for i in range(L):
        B[:, offs[i]:offs[i + 1]].masked_fill_((j[None, :] >= ranks[:, i:i + 1])[:, None, :], float("nan"))
    B = pack_b(B, ranks, offs, fill=float("nan"))  # compact blocks; everything else NaN
    scales = torch.rand(S, L, generator=g, device="cuda") * 1.5 + 0.25
    if slots is None:
        slots = torch.randint(-1, S, (T,), generator=g, device="cuda", dtype=torch.int32)
    x = torch.randn(T, K, generator=g, device="cuda").to(dtype)
    y0 = (0.1 * torch.randn(T, N, generator=g, device="cuda")).to(dtype)
    return dict(x=x, y0=y0, A=A, B=B, ranks=ranks, scales=scales, offs=offs, slots=slots, R=r_max)


def ref_shrink(c):
    """fp64, grouped with boolean masks (independent of LoRAMeta): h [T, L*R] NaN where undefined."""
    T, L, r_max = c["x"].shape[0], c["ranks"].shape[1], c["R"]
    h = torch.full((T, L * r_max), float("nan"), dtype=torch.float64, device="cuda")
    rk = c["ranks"].tolist()
    for s in range(S):
        idx = (c["slots"] == s).nonzero().squeeze(1)
        if idx.numel():
            xs = c["x"][idx].double()
            for i in range(L):
                if rk[s][i]:
                    h[idx, i * r_max:i * r_max + rk[s][i]] = xs @ c["A"][s, i * r_max:i * r_max + rk[s][i]].double().T
    return h


def ref_add(c, h=None):
    y = c["y0"].double().clone()
    h = ref_shrink(c) if h is None else h
    rk, sc, offs, r_max = c["ranks"].tolist(), c["scales"].tolist(), c["offs"], c["R"]
    for s in range(S):
        idx = (c["slots"] == s).nonzero().squeeze(1)
        if idx.numel():
            for i in range(len(offs) - 1):
                if rk[s][i]:
                    b = b_block(c["B"][s], offs[i], offs[i + 1], rk[s][i]).double()
                    y[idx, offs[i]:offs[i + 1]] += sc[s][i] * (h[idx, i * r_max:i * r_max + rk[s][i]] @ b.T)
    return y


def check_y(y, c, ref):
    assert not y.isnan().any(), "NaN leaked from padding"
    widths = torch.tensor([c["offs"][i + 1] - c["offs"][i] for i in range(len(c["offs"]) - 1)], device="cuda")
    col_slice = torch.repeat_interleave(torch.arange(len(widths), device="cuda"), widths)
    tok_rank = torch.where(c["slots"][:, None] >= 0, c["ranks"][c["slots"].clamp_min(0).long()], 0)  # [T, L]
    keep = tok_rank[:, col_slice] == 0  # [T, N]
    assert torch.equal(y[keep], c["y0"][keep]), "rows/slices without an adapter were modified"
    delta = (ref - c["y0"].double()).norm()
    rounding = (ref.to(y.dtype).double() - ref).norm()
    err = ((y.double() - ref).norm() - 2 * rounding).clamp_min(0) / delta.clamp_min(1e-30)
    assert err < TOL[y.dtype], f"relative error {err:.3g} >= {TOL[y.dtype]}"


def run_add(c, backend="triton"):
    y = c["y0"].clone()
    add_lora(y, c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], build_lora_meta(c["slots"], S),
             backend=backend)
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("T", [1, 32, 256, 4096])
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_add_lora_real_shapes(group, T, dtype):
    c = make(T, group, dtype, seed=T + len(group))
    check_y(run_add(c), c, ref_add(c))


@pytest.mark.parametrize("r_max,choices", [(8, (0, 8)), (16, (0, 3, 16)), (256, (0, 17, 200, 256))])
def test_rank_range(r_max, choices):
    c = make(64, "qkv", torch.bfloat16, seed=r_max, r_max=r_max, rank_choices=choices)
    check_y(run_add(c), c, ref_add(c))


@pytest.mark.parametrize("T", [32, 2048])
def test_shrink_and_expand_real_shapes(T):
    c = make(T, "qkv", torch.bfloat16, seed=5)
    meta = build_lora_meta(c["slots"], S)
    out = torch.full((T, c["A"].shape[1]), float("nan"), device="cuda")
    lora_shrink(c["x"], c["A"], c["ranks"], meta, out=out)
    ref = ref_shrink(c)
    defined = ~ref.isnan()
    assert out[~defined].isnan().all() and not out[defined].isnan().any()
    assert (out[defined].double() - ref[defined]).norm() / ref[defined].norm() < 1e-5
    y = c["y0"].clone()
    lora_expand(y, out, c["B"], c["ranks"], c["scales"], c["offs"], meta)
    check_y(y, c, ref_add(c, h=out.double()))


@pytest.mark.parametrize("T,group", [(256, "gate_up"), (4096, "qkv"), (7, "down")])
def test_run_to_run_bitwise_equal(T, group):
    c = make(T, group, torch.bfloat16, seed=9)
    assert torch.equal(run_add(c), run_add(c))


def test_torch_backend_on_cuda_matches():
    c = make(96, "qkv", torch.bfloat16, seed=4)
    check_y(run_add(c, backend="torch"), c, ref_add(c))


def test_all_tokens_without_adapter():
    c = make(256, "gate_up", torch.bfloat16, seed=2, slots=torch.full((256,), -1, dtype=torch.int32, device="cuda"))
    assert torch.equal(run_add(c), c["y0"])


def capture(step) -> torch.cuda.CUDAGraph:
    """step captured in a graph after two warm-up runs on a side stream (the runner's own capture_graph)."""
    from loramux.server.runner.cuda_graphs import capture_graph

    return capture_graph(step, None)[0]


@pytest.mark.parametrize("T", [1, 64, 256])
def test_cuda_graph_capture_matches_eager(T):
    """build_lora_meta + add_lora on all four groups of a layer, captured once, replayed with new slots."""
    dtype = torch.bfloat16
    cases = {gname: make(T, gname, dtype, seed=50 + i, r_max=16, rank_choices=(0, 4, 16))
             for i, gname in enumerate(GROUPS)}
    static_slots = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    meta = LoRAMeta.empty(512, S, "cuda")
    ys = {k: torch.empty_like(c["y0"]) for k, c in cases.items()}

    def step():
        build_lora_meta(static_slots, S, out=meta)
        for k, c in cases.items():
            add_lora(ys[k], c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend="triton")

    graph = capture(step)
    g = torch.Generator(device="cuda").manual_seed(T)
    assignments = [torch.randint(-1, S, (T,), generator=g, device="cuda", dtype=torch.int32),
                   torch.full((T,), -1, dtype=torch.int32, device="cuda"),
                   torch.full((T,), 3, dtype=torch.int32, device="cuda"),
                   torch.randint(0, 4, (T,), generator=g, device="cuda", dtype=torch.int32)]
    for slots in assignments:
        static_slots.copy_(slots)
        for k, c in cases.items():
            ys[k].copy_(c["y0"])
        graph.replay()
        torch.cuda.synchronize()
        for k, c in cases.items():
            c = dict(c, slots=slots)
            eager = run_add(c)
            assert torch.equal(ys[k], eager), f"graph replay differs from eager ({k})"
            check_y(ys[k], c, ref_add(c))


# Fused single-launch kernel (kernels/lora_fused_triton.py), forced on with fused=True; decode sizes.
DECODE = [(1, 1), (32, 1), (32, 8), (64, 1), (64, 8)]  # (T, D distinct adapters)


def decode_slots(T, D, seed):
    """T tokens over D distinct random slots; token 0 without adapter when T > 1."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    adapters = torch.randperm(S, generator=g, device="cuda")[:D]
    slots = adapters[torch.randint(D, (T,), generator=g, device="cuda")].to(torch.int32)
    if T > 1:
        slots[0] = -1
    return slots


def run_path(c, fused):
    y = c["y0"].clone()
    add_lora(y, c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], build_lora_meta(c["slots"], S),
             backend="triton", fused=fused)
    return y


@pytest.mark.parametrize("T,D", DECODE)
@pytest.mark.parametrize("group", list(GROUPS))
def test_fused_real_shapes(group, T, D):
    from loramux.kernels.lora_fused_triton import use_fused

    c = make(T, group, torch.bfloat16, seed=300 + T + D, slots=decode_slots(T, D, seed=T * 10 + D))
    y = run_path(c, True)
    check_y(y, c, ref_add(c))
    y2 = run_path(c, False)  # two-launch path: same up to fp32 summation order (<= 2 bf16 ulps)
    r = 2 * torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(y.float(), y2.float(), rtol=r, atol=r * y2.float().abs().max().item())
    assert torch.equal(y, run_path(c, True)), "fused path not run-to-run deterministic"
    K = GROUPS[group][0]
    if use_fused(T, K, R):  # the heuristic picks this kernel
        assert torch.equal(y, run_path(c, None))


@pytest.mark.parametrize("r_max,choices", [(16, (0, 3, 16)), (128, (0, 1, 65, 128)), (256, (0, 17, 200, 256))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_ranks_and_dtypes(dtype, r_max, choices):
    c = make(64, "qkv", dtype, seed=r_max, r_max=r_max, rank_choices=choices, slots=decode_slots(64, 8, seed=1))
    check_y(run_path(c, True), c, ref_add(c))


@pytest.mark.parametrize("T", [1, 32, 64])
def test_fused_cuda_graph_capture_matches_eager(T):
    """add_lora forced fused on all four groups of a layer, captured once, replayed with new slots == eager."""
    cases = {gname: make(T, gname, torch.bfloat16, seed=70 + i) for i, gname in enumerate(GROUPS)}
    static_slots = torch.full((T,), -1, dtype=torch.int32, device="cuda")
    meta = LoRAMeta.empty(64, S, "cuda")
    ys = {k: torch.empty_like(c["y0"]) for k, c in cases.items()}

    def step():
        build_lora_meta(static_slots, S, out=meta)
        for k, c in cases.items():
            add_lora(ys[k], c["x"], c["A"], c["B"], c["ranks"], c["scales"], c["offs"], meta, backend="triton",
                     fused=True)

    graph = capture(step)
    for D in (1, 8):
        slots = decode_slots(T, D, seed=D)
        static_slots.copy_(slots)
        for k, c in cases.items():
            ys[k].copy_(c["y0"])
        graph.replay()
        torch.cuda.synchronize()
        for k, c in cases.items():
            c = dict(c, slots=slots)
            assert torch.equal(ys[k], run_path(c, True)), f"graph replay differs from eager ({k}, D={D})"
            check_y(ys[k], c, ref_add(c))
