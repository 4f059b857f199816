"""GPU benchmark of paged-attention decode (Triton vs torch reference vs SDPA on contiguous K/V), Llama-3-8B shapes."""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from loramux.loadtest.bench.gpu_timing import copy_bandwidth, cuda_time_us
from loramux.kernels import attention_triton as tri
from loramux.kernels.attention import paged_attention, write_kv

H, HKV, D, BS = 32, 8, 128, 16  # Llama-3-8B attention: 32 query heads, 8 KV heads of 128; cache blocks of 16
CASES = [(b, L) for b in (1, 32, 64) for L in (512, 2048, 8192)]


def graphed(fn):
    """Capture fn once; returns graph.replay (launch overhead removed, as in the engine's decode graphs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def make_decode(B: int, L: int, dtype, seed: int = 0) -> dict:
    """Every sequence has L tokens in randomly permuted cache blocks; q [B, H, D] is the newest token."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    nb = L // BS
    k_cache = torch.randn(B * nb, BS, HKV, D, generator=g, device="cuda").to(dtype)  # [NB, BS, Hkv, D]
    v_cache = torch.randn(B * nb, BS, HKV, D, generator=g, device="cuda").to(dtype)
    tables = torch.randperm(B * nb, generator=g, device="cuda").to(torch.int32).view(B, nb)  # [B, MB]
    q = torch.randn(B, H, D, generator=g, device="cuda").to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
                seq_lens=torch.full((B,), L, dtype=torch.int32, device="cuda"), seq_lens_list=[L] * B,
                query_lens=[1] * B, scale=D ** -0.5)


def attn(c, backend, **kw):
    return lambda: paged_attention(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"],
                                   c["seq_lens_list"], c["query_lens"], c["scale"], backend=backend, **kw)


def run_case(B: int, L: int, dtype, iters: int, copy_bps: float) -> dict:
    c = make_decode(B, L, dtype)
    esz = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * B * L * HKV * D * esz
    out = attn(c, "triton")()
    ref = attn(c, "torch")()
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    t_eager = cuda_time_us(attn(c, "triton"), iters)
    t_graph = cuda_time_us(graphed(attn(c, "triton")), iters)
    t_ref = cuda_time_us(attn(c, "torch"), max(3, iters // 10))
    # SDPA on unpaged, contiguous K/V [B, Hkv, L, D]: the G query heads of a KV head act as G query rows
    k = c["k_cache"][c["block_tables"].long()].reshape(B, L, HKV, D).transpose(1, 2).contiguous()
    v = c["v_cache"][c["block_tables"].long()].reshape(B, L, HKV, D).transpose(1, 2).contiguous()
    qs = c["q"].view(B, HKV, H // HKV, D)
    sdpa = lambda: F.scaled_dot_product_attention(qs, k, v, scale=c["scale"])  # noqa: E731
    sdpa_err = float((sdpa().reshape(B, H, D).double() - ref.double()).norm() / ref.double().norm())
    t_sdpa = cuda_time_us(graphed(sdpa), iters)
    splits = tri.default_num_splits(B, HKV, c["block_tables"].shape[1], BS, c["q"].device)
    del c, k, v
    torch.cuda.empty_cache()
    return dict(B=B, L=L, kv_bytes=kv_bytes, splits=splits, floor_us=kv_bytes / copy_bps * 1e6, triton_graph_us=t_graph,
                triton_eager_us=t_eager, torch_ref_us=t_ref, sdpa_graph_us=t_sdpa, err=err, sdpa_err=sdpa_err)


def sweep(dtype, iters: int) -> list[str]:
    """Decode tile/split variants on a few shapes (graph replay us), to pick the defaults."""
    lines = []
    for B, L in [(1, 8192), (32, 2048), (64, 512), (64, 8192)]:
        c = make_decode(B, L, dtype)
        base = tri.default_num_splits(B, HKV, c["block_tables"].shape[1], BS, c["q"].device)
        res = []
        for bn in (32, 64, 128):
            for stages in (2, 3, 4):
                for sp in sorted({max(1, base // 2), base, min(64, base * 2)}):
                    fn = lambda: tri.decode(c["q"], c["k_cache"], c["v_cache"], c["block_tables"],  # noqa: E731
                                            c["seq_lens"], c["scale"], None, sp, bn, 4, stages)
                    res.append((cuda_time_us(graphed(fn), iters), bn, stages, sp))
        res.sort()
        lines.append(f"B={B} L={L} default splits={base}: " +
                     ", ".join(f"{t:.1f}us(bn={bn},st={st},sp={sp})" for t, bn, st, sp in res[:6]))
        del c
    return lines


def write_kv_times(dtype, iters: int) -> list[str]:
    lines = []
    for T in (64, 2048):
        kc = torch.zeros(4096, BS, HKV, D, dtype=dtype, device="cuda")
        vc = torch.zeros_like(kc)
        kv = torch.randn(T, 2, HKV, D, device="cuda").to(dtype)
        slots = torch.randperm(4096 * BS, device="cuda")[:T]
        t = {b: cuda_time_us(graphed(lambda b=b: write_kv(kv[:, 0], kv[:, 1], kc, vc, slots, backend=b)), iters)
             for b in ("triton", "torch")}
        lines.append(f"write_kv T={T}: triton {t['triton']:.1f} us (1 launch), index_copy_ {t['torch']:.1f} us")
    return lines


def prefill_times(dtype, iters: int) -> list[str]:
    """Fresh 2048-token prompts through the Triton prefill kernel vs causal SDPA on contiguous K/V."""
    lines = []
    for B, n in ((1, 2048), (4, 2048)):
        c = make_decode(B, n, dtype)
        c["q"] = torch.randn(B * n, H, D, device="cuda").to(dtype)
        c["query_lens"] = [n] * B
        flops = 4 * B * H * D * n * (n + 1) / 2  # causal: QK^T and PV over the visible pairs
        t = cuda_time_us(attn(c, "triton"), iters)
        k = c["k_cache"][c["block_tables"].long()].reshape(B, n, HKV, D).transpose(1, 2).contiguous()
        v = c["v_cache"][c["block_tables"].long()].reshape(B, n, HKV, D).transpose(1, 2).contiguous()
        qs = c["q"].view(B, n, H, D).transpose(1, 2)
        ts = cuda_time_us(lambda: F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=c["scale"],
                                                                  enable_gqa=True), iters)
        lines.append(f"prefill B={B} prompt={n}: triton {t:.1f} us ({flops / t / 1e6:.0f} TFLOP/s), "
                     f"sdpa causal {ts:.1f} us ({flops / ts / 1e6:.0f} TFLOP/s)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--sweep", action="store_true", help="also time decode tile/split variants")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    copy_bps = copy_bandwidth()
    rows = []
    for B, L in CASES:
        rows.append(run_case(B, L, dtype, args.iters, copy_bps))
        print(f"# {rows[-1]}", file=sys.stderr, flush=True)
    extra = write_kv_times(dtype, args.iters) + prefill_times(dtype, max(10, args.iters // 5)) + (sweep(dtype, max(20, args.iters // 4)) if args.sweep else [])
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_bps / 1e12:.2f} TB/s; decode, "
          f"H={H} Hkv={HKV} D={D}, {args.dtype}, block size {BS}, one layer call; times in us")
    print("K/V MB = bytes of K and V read; floor = those bytes / copy bandwidth; triton graph = replayed from a "
          "CUDA graph, eager = Python launch; sdpa = F.scaled_dot_product_attention on contiguous unpaged K/V (graph)")
    hdr = ("| B | context | K/V MB | splits | floor us | triton graph us | GB/s | x copy bw | triton eager us "
           "| torch ref us | sdpa us | GB/s sdpa | ref / triton | sdpa / triton | rel err |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for w in rows:
        gbps, sgbps = w["kv_bytes"] / w["triton_graph_us"] / 1e3, w["kv_bytes"] / w["sdpa_graph_us"] / 1e3
        print(f"| {w['B']} | {w['L']} | {w['kv_bytes'] / 1e6:.1f} | {w['splits']} | {w['floor_us']:.1f} | "
              f"{w['triton_graph_us']:.1f} | {gbps:.0f} | {gbps * 1e9 / copy_bps:.2f} | {w['triton_eager_us']:.1f} | "
              f"{w['torch_ref_us']:.1f} | {w['sdpa_graph_us']:.1f} | {sgbps:.0f} | "
              f"{w['torch_ref_us'] / w['triton_graph_us']:.1f}x | {w['sdpa_graph_us'] / w['triton_graph_us']:.2f}x | "
              f"{w['err']:.1e} |")
    for line in extra:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_bps=copy_bps, args=vars(args), rows=rows, extra=extra), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
