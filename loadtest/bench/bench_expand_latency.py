"""GPU microbenchmark: where a decode step's LoRA expand time goes (issue 4). Each op is launched back to back
inside one CUDA graph (as in the engine's decode graphs), so the figure is its GPU time per launch without host
launch cost. Variants isolate one suspect at a time: the number of split-K partials each program sums (P), idle
slot programs (S), column tiles per program (n_iters), beside the plain ops the fused expands replace.

    python -m loramux.loadtest.bench.bench_expand_latency [--tokens 32] [--rank 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from loramux.kernels import fused_ops_triton, lora_mlp_triton, lora_qkv_triton
from loramux.kernels import lora_triton as tri
from loramux.kernels.lora import build_lora_meta
from loramux.loadtest.bench.gpu_timing import copy_bandwidth

H, I = 4096, 14336  # Llama-3-8B hidden and intermediate sizes
DEV = "cuda"  # --dry: "cpu" (each op run once under TRITON_INTERPRET=1, tiny sizes; keeps this file from rotting)


@triton.jit
def _noop_kernel(p):
    pass


def graph_us(fn, launches: int = 40, replays: int = 20) -> float:
    """GPU microseconds per call of fn, from a CUDA graph of `launches` calls replayed `replays` times."""
    if DEV == "cpu":
        fn()
        return 0.0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * launches)


def lora_case(T: int, D: int, S: int, r: int, N: int, L: int, P: int, gen: torch.Generator):
    """Inputs of one expand: y [T, N], partials fp32 [P, T, L*r], B [S, N, r], ranks/scales [S, L], meta."""
    dev, bf = DEV, torch.bfloat16
    slots = (torch.arange(T, device=dev) % D).to(torch.int32)
    y = torch.randn(T, N, device=dev, generator=gen).to(bf)
    buf = torch.randn(P, T, L * r, device=dev, generator=gen) * 0.01
    b = (torch.randn(S, N, r, device=dev, generator=gen) * 0.01).to(bf)
    ranks = torch.full((S, L), r, dtype=torch.int32, device=dev)
    scales = torch.full((S, L), 2.0, dtype=torch.float32, device=dev)
    return y, buf, b, ranks, scales, build_lora_meta(slots, S)


def run(T: int, r: int) -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows: list[dict] = []

    def add(name: str, fn, nbytes: int = 0) -> None:
        us = graph_us(fn)
        rows.append(dict(op=name, us=us, bytes=nbytes))

    z = torch.zeros(1, device=DEV)
    add("noop triton kernel (1 program)", lambda: _noop_kernel[(1,)](z))
    gu = torch.randn(T, 2 * I, device=DEV, generator=gen).to(torch.bfloat16)
    add("silu_mul [T, 2I]", lambda: fused_ops_triton.silu_mul(gu), 3 * T * I * 2)
    xh, res, w = (torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16) for _ in range(3))
    add("add + rms_norm [T, H]", lambda: fused_ops_triton.rms_norm(xh, w[0], 1e-5, res), 4 * T * H * 2)
    for D, S, P, n_it in [(1, 32, 8, None), (1, 32, 1, None), (1, 1, 8, None), (1, 32, 8, 1), (1, 32, 8, 4),
                          (32, 32, 8, None), (32, 32, 1, None)]:
        y, buf, b, ranks, scales, meta = lora_case(T, D, S, r, 2 * I, 2, P, gen)
        nb = 3 * T * I * 2 + D * 2 * I * r * 2
        add(f"expand_silu D={D} S={S} P={P} n_iters={n_it or tri.DECODE_N_ITERS}",
            lambda: lora_mlp_triton.expand_silu(y, buf, b, ranks, scales, meta, n_iters=n_it), nb)
    nh, nkv, hd = H // 128, H // 512, 128  # Llama-3-8B: 32 q heads, 8 kv heads of 128
    pos = torch.arange(T, device=DEV) + 100
    cos, sin = (torch.randn(4096, hd, device=DEV, generator=gen) for _ in range(2))
    kc, vc = (torch.empty(T // 16 + 1, 16, nkv, hd, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    for D, S, P in [(1, 32, 8), (1, 1, 8), (32, 32, 8)]:  # q|k|v expand + RoPE + KV write
        y, buf, b, ranks, scales, meta = lora_case(T, D, S, r, (nh + 2 * nkv) * hd, 3, P, gen)
        nb = 2 * T * (nh + 2 * nkv) * hd * 2 + D * (nh + 2 * nkv) * hd * r * 2
        add(f"expand_rope_kv D={D} S={S} P={P}", lambda: lora_qkv_triton.expand_rope_kv(
            y, buf, b, ranks, scales, meta, pos, cos, sin, kc, vc, torch.arange(T, device=DEV), nh, nkv, hd), nb)
    for D, S, P, n_it in [(1, 32, 8, None), (1, 32, 1, None), (1, 1, 8, None), (1, 32, 16, None),
                          (1, 32, 8, 1), (32, 32, 8, None), (32, 32, 1, None)]:
        y, buf, b, ranks, scales, meta = lora_case(T, D, S, r, H, 1, P, gen)
        nb = 2 * T * H * 2 + D * H * r * 2
        add(f"expand o/down [T, {H}] D={D} S={S} P={P} n_iters={n_it or tri.DECODE_N_ITERS}",
            lambda: tri.expand(y, buf, b, ranks, scales, (0, H), meta, n_iters=n_it), nb)
    for D in (1, 32):  # the shrinks they follow (side stream in the engine), gate|up: K = H, 2 slices
        x = torch.randn(T, H, device=DEV, generator=gen).to(torch.bfloat16)
        a = (torch.randn(32, 2 * r, H, device=DEV, generator=gen) * 0.01).to(torch.bfloat16)
        ranks = torch.full((32, 2), r, dtype=torch.int32, device=DEV)
        meta = build_lora_meta((torch.arange(T, device=DEV) % D).to(torch.int32), 32)
        plan = tri.shrink_plan(T, H, 2, r, x.device)
        out = torch.empty(plan["parts"], T, 2 * r, device=DEV)
        add(f"shrink gate|up D={D} P={plan['parts']}", lambda: tri.shrink(x, a, ranks, meta, out, plan),
            T * H * 2 + D * 2 * r * H * 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="decode batch (tokens in the step)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--dry", action="store_true", help="CPU check: each op once, tiny sizes (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global DEV, H, I
    if args.dry:
        DEV, H, I = "cpu", 512, 96  # H: 4 q heads, 1 kv head of 128
    bps = 1.0 if args.dry else copy_bandwidth()
    rows = run(args.tokens, args.rank)
    print(f"T={args.tokens} r={args.rank} bf16, copy rate {bps / 1e12:.2f} TB/s; GPU time per launch in a CUDA graph")
    print(f"{'op':58s} {'us':>7s} {'floor us':>8s} {'ratio':>6s}")
    for row in rows:
        floor = row["bytes"] / bps * 1e6
        row["floor_us"] = floor
        ratio = f"{row['us'] / floor:6.1f}" if floor and row["us"] else "     -"
        print(f"{row['op']:58s} {row['us']:7.2f} {floor:8.2f} {ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=args.tokens, rank=args.rank, copy_bps=bps, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
