"""GPU benchmark of loramux multi-LoRA kernels on one Llama-3-8B layer (qkv, o, gate_up, down) vs torch paths."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from loramux.loadtest.bench.gpu_timing import copy_bandwidth, cuda_time_us
from loramux.kernels import lora_fused_triton as fused_k
from loramux.kernels import lora_triton as tri
from loramux.kernels.lora import add_lora, build_lora_meta

# (name, K, slice widths): Llama-3-8B, GQA 32 q heads / 8 kv heads of 128
GROUPS = [("qkv", 4096, (4096, 1024, 1024)), ("o", 4096, (4096,)), ("gate_up", 4096, (14336, 14336)),
          ("down", 14336, (4096,))]
CASES = [(1, 1), (32, 1), (32, 4), (32, 32), (64, 1), (64, 4), (64, 32), (256, 1), (256, 4), (256, 32),
         (4096, 1), (4096, 4), (4096, 32)]  # (T tokens, D distinct adapters)
BREAKDOWN, SWEEP = [(1, 1), (32, 32), (256, 32), (4096, 4)], [(32, 32), (4096, 4)]
GRID = [(T, D) for T in (1, 8, 32, 64, 256, 2048) for D in (1, 8, 32, 64)]  # issue 4's grid (D <= T kept)


def build_layer(S: int, r: int, dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    layer = []
    for name, K, widths in GROUPS:
        L, N = len(widths), sum(widths)
        a = (torch.randn(S, L * r, K, generator=g, device="cuda") * 0.01).to(dtype)  # [S, L*R, K]
        b = (torch.randn(S, N, r, generator=g, device="cuda") * 0.01).to(dtype)  # [S, N, R]
        ranks = torch.full((S, L), r, dtype=torch.int32, device="cuda")
        scales = torch.full((S, L), 2.0, dtype=torch.float32, device="cuda")
        offs = tuple(int(v) for v in torch.tensor([0, *widths]).cumsum(0))
        layer.append(dict(name=name, K=K, N=N, L=L, a=a, b=b, ranks=ranks, scales=scales, offs=offs))
    return layer


def gather_bmm(grp, x, y, slots):
    """Plain torch baseline: gather each token's A/B (all tokens have an adapter here; full rank), bmm."""
    a, b = grp["a"][slots], grp["b"][slots]  # [T, L*R, K], [T, N, R]
    h = torch.bmm(x.unsqueeze(1), a.transpose(1, 2)).float()  # [T, 1, L*R]
    r = grp["b"].shape[2]
    for i in range(grp["L"]):
        lo, hi = grp["offs"][i], grp["offs"][i + 1]
        d = torch.bmm(h[:, :, i * r:(i + 1) * r].to(x.dtype), b[:, lo:hi].transpose(1, 2)).squeeze(1)
        y[:, lo:hi] += (grp["scales"][slots, i:i + 1] * d.float()).to(y.dtype)


def run_case(layer, T: int, D: int, S: int, r: int, dtype, iters: int, copy_bps: float,
             torch_ref: bool = True, fused: bool | None = None, fused_col: bool = False) -> dict:
    """fused: add_lora's path for the triton columns (None = heuristic); fused_col: also time the fused path
    forced on (T <= FUSED_MAX_T) from a CUDA graph -> fused_graph_us."""
    g = torch.Generator(device="cuda").manual_seed(T * 1000 + D)
    slots = (torch.arange(T, device="cuda") % D)[torch.randperm(T, generator=g, device="cuda")].to(torch.int32)
    xs = [torch.randn(T, grp["K"], generator=g, device="cuda").to(dtype) for grp in layer]
    ys = [torch.zeros(T, grp["N"], device="cuda", dtype=dtype) for grp in layer]
    meta = build_lora_meta(slots, S)
    esz = torch.finfo(dtype).bits // 8
    nbytes = sum(T * grp["K"] * esz + 2 * T * grp["N"] * esz + D * (grp["L"] * r * grp["K"] + grp["N"] * r) * esz
                 for grp in layer)

    def layer_fn(backend, path=fused):
        def f():
            for grp, x, y in zip(layer, xs, ys):
                add_lora(y, x, grp["a"], grp["b"], grp["ranks"], grp["scales"], grp["offs"], meta, backend=backend,
                         fused=path)
        return f

    def graph_us(fn):  # fn already ran eagerly (compiled)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return cuda_time_us(graph.replay, iters)

    tri = layer_fn("triton")
    t_eager = cuda_time_us(tri, iters)
    t_graph = graph_us(tri)
    t_fused = None
    if fused_col and T <= fused_k.FUSED_MAX_T:
        layer_fn("triton", True)()
        t_fused = graph_us(layer_fn("triton", True))
    t_torch = cuda_time_us(layer_fn("torch"), max(3, iters // 10)) if torch_ref else None
    t_bmm = None
    if T <= 256:
        slots_l = slots.long()
        t_bmm = cuda_time_us(lambda: [gather_bmm(grp, x, y, slots_l) for grp, x, y in zip(layer, xs, ys)],
                             max(3, iters // 10))
    floor = nbytes / copy_bps * 1e6
    meta_us = cuda_time_us(lambda: build_lora_meta(slots, S, out=meta), iters)
    return dict(T=T, D=D, r=r, bytes=nbytes, floor_us=floor, triton_graph_us=t_graph, triton_eager_us=t_eager,
                fused_graph_us=t_fused, torch_ref_us=t_torch, gather_bmm_us=t_bmm, meta_us=meta_us,
                triton_gbps=nbytes / (t_graph * 1e-6) / 1e9)


def graph_time_us(fn, reps: int = 20, replays: int = 10) -> float:
    """Device time of fn (a few kernel launches): reps copies captured in one graph, replayed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return cuda_time_us(graph.replay, replays, warmup=1) / reps


def breakdown(layer, T: int, D: int, S: int, r: int, dtype, copy_bps: float, sweep: bool) -> list[str]:
    """Per group: shrink and expand alone (device time, byte floor); with sweep, a few launch variants."""
    g = torch.Generator(device="cuda").manual_seed(7)
    slots = (torch.arange(T, device="cuda") % D)[torch.randperm(T, generator=g, device="cuda")].to(torch.int32)
    meta = build_lora_meta(slots, S)
    esz = torch.finfo(dtype).bits // 8
    out = []
    for grp in layer:
        K, N, L = grp["K"], grp["N"], grp["L"]
        x = torch.randn(T, K, device="cuda").to(dtype)
        y = torch.zeros(T, N, device="cuda", dtype=dtype)
        plan = tri.shrink_plan(T, K, L, r, x.device)
        buf = torch.zeros(plan["parts"], T, L * r, device="cuda")
        sb = T * K * esz + D * L * r * K * esz + plan["parts"] * T * L * r * 4
        eb = D * N * r * esz + 2 * T * N * esz + plan["parts"] * T * L * r * 4
        ts = graph_time_us(lambda: tri.shrink(x, grp["a"], grp["ranks"], meta, buf, plan))
        te = graph_time_us(lambda: tri.expand(y, buf, grp["b"], grp["ranks"], grp["scales"], grp["offs"], meta))
        fb = T * K * esz + D * (L * r * K + N * r) * esz + 2 * T * N * esz

        def fused_us(chunk=None):
            return graph_time_us(lambda: fused_k.fused_add_lora(y, x, grp["a"], grp["b"], grp["ranks"], grp["scales"],
                                                                grp["offs"], meta, chunk))
        small = T <= fused_k.FUSED_MAX_T
        line = (f"| {T} | {D} | {grp['name']} | {plan['parts']} | {ts:.1f} | {sb / copy_bps * 1e6:.1f} | "
                f"{te:.1f} | {eb / copy_bps * 1e6:.1f} | " + (f"{fused_us():.1f}" if small else "-") +
                f" | {fb / copy_bps * 1e6:.1f} |")
        if sweep:
            alt = []
            for sk in (1, 2, 4, 8, 16):
                p2 = tri.shrink_plan(T, K, L, r, x.device, sk)
                b2 = torch.zeros(p2["parts"], T, L * r, device="cuda")
                t = graph_time_us(lambda: tri.shrink(x, grp["a"], grp["ranks"], meta, b2, p2))
                alt.append(f"split{p2['parts']}={t:.1f}")
            for ni in (1, 2, 4):
                t = graph_time_us(lambda: tri.expand(y, buf, grp["b"], grp["ranks"], grp["scales"], grp["offs"], meta,
                                                     n_iters=ni))
                alt.append(f"nit{ni}={t:.1f}")
            for ch in ((256, 1024, 2048) if small else ()):  # fused columns per program (default FUSED_CHUNK)
                alt.append(f"fused_ch{ch}={fused_us(ch):.1f}")
            line += " " + " ".join(alt) + " |"
        out.append(line)
    return out


def run_grid(args, dtype, copy_bps: float) -> int:
    """Issue 4's grid: time, byte floor and ratio, gather+bmm beside it (T <= 256), per rank; 64 slots. Two-launch
    = shrink + expand forced (fused=False); fused = the single-launch kernel forced (T <= FUSED_MAX_T)."""
    print("| r | T | D | MB moved | floor us | two-launch graph us | x floor | fused graph us | x floor | "
          "two-launch eager us | gather+bmm us | bmm / graph |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in (int(v) for v in args.ranks.split(",")):
        layer = build_layer(64, r, dtype)
        for T, D in GRID:
            if D > T:
                continue
            w = run_case(layer, T, D, 64, r, dtype, args.iters if T <= 256 else max(20, args.iters // 10), copy_bps,
                         torch_ref=False, fused=False, fused_col=True)
            rows.append(w)
            bmm, graph_us, fu = w["gather_bmm_us"], w["triton_graph_us"], w["fused_graph_us"]
            bmm_cols = "- | -" if bmm is None else f"{bmm:.1f} | {bmm / graph_us:.1f}x"
            fused_cols = "- | -" if fu is None else f"{fu:.1f} | {fu / w['floor_us']:.2f}"
            print(f"| {r} | {T} | {D} | {w['bytes'] / 1e6:.1f} | {w['floor_us']:.1f} | {graph_us:.1f} | "
                  f"{graph_us / w['floor_us']:.2f} | {fused_cols} | {w['triton_eager_us']:.1f} | {bmm_cols} |",
                  flush=True)
        del layer
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bps=copy_bps, args=vars(args), rows=rows), f,
                      indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=32, help="GPU adapter slots (max_loras)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--breakdown", action="store_true", help="also time shrink / expand of each group alone")
    ap.add_argument("--sweep", action="store_true", help="with --breakdown: try split-K and N-tile variants")
    ap.add_argument("--grid", action="store_true", help="issue 4's grid: T 1..2048 x D 1..64 x --ranks (64 slots, "
                    "no torch reference column)")
    ap.add_argument("--ranks", default="8,16,64", help="ranks of the --grid run")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    copy_bps = copy_bandwidth()
    if args.grid:
        return run_grid(args, dtype, copy_bps)
    layer = build_layer(args.slots, args.rank, dtype)
    rows = [run_case(layer, T, D, args.slots, args.rank, dtype, args.iters if T <= 256 else max(20, args.iters // 10),
                     copy_bps) for T, D in CASES if D <= T]
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_bps / 1e12:.2f} TB/s; "
          f"one Llama-3-8B layer (qkv, o, gate_up, down), {args.dtype}, r={args.rank}, {args.slots} slots")
    print("floor = (x read + y read/write + A/B of the D adapters) / copy bandwidth; times in us per layer;"
          " graph = Triton replayed from a CUDA graph, eager = Python launches")
    hdr = ("| T | D | MB moved | floor us | triton graph us | x floor | GB/s | % copy bw | triton eager us "
           "| torch ref us | gather+bmm us | ref / graph | bmm / graph | meta us |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for w in rows:
        bmm = f"{w['gather_bmm_us']:.1f}" if w["gather_bmm_us"] else "-"
        bmm_x = f"{w['gather_bmm_us'] / w['triton_graph_us']:.1f}x" if w["gather_bmm_us"] else "-"
        print(f"| {w['T']} | {w['D']} | {w['bytes'] / 1e6:.1f} | {w['floor_us']:.1f} | {w['triton_graph_us']:.1f} | "
              f"{w['triton_graph_us'] / w['floor_us']:.2f} | {w['triton_gbps']:.0f} | "
              f"{100 * w['triton_gbps'] * 1e9 / copy_bps:.0f}% | {w['triton_eager_us']:.1f} | "
              f"{w['torch_ref_us']:.1f} | "
              f"{bmm} | {w['torch_ref_us'] / w['triton_graph_us']:.1f}x | {bmm_x} | {w['meta_us']:.1f} |")
    if args.breakdown:
        print("\nper group, device time from CUDA graphs (us); floor = that kernel's bytes / copy bandwidth")
        print("| T | D | group | split-K parts | shrink us | shrink floor | expand us | expand floor | fused us | "
              "fused floor |" + (" sweep (us) |" if args.sweep else ""))
        print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.sweep else ""))
        for T, D in BREAKDOWN:
            for line in breakdown(layer, T, D, args.slots, args.rank, dtype, copy_bps, args.sweep and (T, D) in SWEEP):
                print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, copy_bps=copy_bps, args=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
