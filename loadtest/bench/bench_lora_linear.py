"""GPU benchmark: what LoRA adds to one Llama-3-8B layer's four linear groups WITH their base GEMMs (the time a step
actually pays), per LoRA path: serial shrink/expand, shrink overlapped with the GEMM (LORAMUX_LORA_OVERLAP), and
the gate|up expand fused with SiLU*mul (LORAMUX_FUSED_LORA_MLP), alone and together.

    python -m loramux.loadtest.bench.bench_lora_linear [--rank 16] [--json out.json]

Per (T tokens, D distinct adapters): device time of the layer's GEMMs + SiLU*mul without adapters (base), and
the time each path adds to it, next to the LoRA byte floor (the D adapters' A and B read once, over the copy rate
measured in the same run) and issue 4's decode target (1.3x that floor plus one launch per group, a launch
counted as the time of an empty kernel in a CUDA graph, measured here too). All from CUDA graphs."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from loramux.kernels.fused_ops import silu_mul
from loramux.kernels.lora import build_lora_meta, gate_up_silu, lora_linear
from loramux.loadtest.bench.bench_lora_kernels import GROUPS, build_layer, graph_time_us
from loramux.loadtest.bench.gpu_timing import copy_bandwidth

CASES = [(T, D) for T in (1, 8, 32, 64, 256, 2048) for D in (1, 8, 32, 64) if D <= T]
PATHS = {"serial": (False, False), "overlap": (True, False), "fused_mlp": (False, True), "both": (True, True)}


def layer_step(layer, ws, x, meta, lora: bool, overlap: bool, fused: bool):
    """One layer's linear work: qkv, o, gate_up + SiLU*mul, down (inputs reuse x / the act; shapes as Llama)."""
    T = x.shape[0]

    def run():
        out = []
        for grp, w in zip(layer, ws):
            inp = out[-1] if grp["name"] == "down" else x[:, :grp["K"]]
            if not lora:
                y = torch.nn.functional.linear(inp, w)
                out.append(silu_mul(y, backend="triton") if grp["name"] == "gate_up" else y)
            elif grp["name"] == "gate_up":
                out.append(gate_up_silu(inp, w, None, grp["a"], grp["b"], grp["ranks"], grp["scales"], grp["offs"],
                                        meta, backend="triton", silu_backend="triton", fused=fused, overlap=overlap))
            else:
                out.append(lora_linear(inp, w, None, grp["a"], grp["b"], grp["ranks"], grp["scales"], grp["offs"],
                                       meta, backend="triton", overlap=overlap))
        assert out[-1].shape == (T, 4096)
        return out
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora_linear: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype, r, S = torch.bfloat16, args.rank, 64
    copy_bps = copy_bandwidth()
    empty = torch.empty(1, device="cuda")
    launch_us = graph_time_us(lambda: empty.add_(0), reps=50)  # one tiny kernel in a graph: the launch cost
    layer = build_layer(S, r, dtype)
    g = torch.Generator(device="cuda").manual_seed(1)
    ws = [(torch.randn(grp["N"], grp["K"], generator=g, device="cuda") * 0.02).to(dtype) for grp in layer]
    print(f"{torch.cuda.get_device_name()}: copy {copy_bps / 1e12:.2f} TB/s, graph launch {launch_us:.1f} us; "
          f"rank {r}, {S} slots, one layer's GEMMs + LoRA; added us = path - base")
    print("| T | D | base us | LoRA floor us | target us | " + " | ".join(f"+{p} us" for p in PATHS) +
          " | best / target |")
    print("|---|---|---|---|---|" + "---|" * len(PATHS) + "---|")
    rows = []
    for T, D in CASES:
        slots = (torch.arange(T, device="cuda") % D)[torch.randperm(T, generator=g, device="cuda")].to(torch.int32)
        meta = build_lora_meta(slots, S)
        x = torch.randn(T, 4096, generator=g, device="cuda").to(dtype)
        reps = 20 if T <= 256 else 5
        base = graph_time_us(layer_step(layer, ws, x, meta, False, False, False), reps=reps)
        added = {p: graph_time_us(layer_step(layer, ws, x, meta, True, ov, fu), reps=reps) - base
                 for p, (ov, fu) in PATHS.items()}
        lora_bytes = D * sum((grp["L"] * r * grp["K"] + grp["N"] * r) * 2 for grp in layer)
        floor = lora_bytes / copy_bps * 1e6
        target = 1.3 * floor + len(GROUPS) * launch_us
        best = min(added.values())
        rows.append(dict(T=T, D=D, base_us=base, floor_us=floor, target_us=target, added_us=added))
        print(f"| {T} | {D} | {base:.1f} | {floor:.1f} | {target:.1f} | " +
              " | ".join(f"{v:.1f}" for v in added.values()) + f" | {best / target:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bps=copy_bps, launch_us=launch_us,
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
