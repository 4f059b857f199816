"""GPU benchmark: what LoRA adds to one Llama-3-8B layer's four linear groups WITH their base GEMMs and the ops
that follow them (RoPE + KV write after qkv, SiLU*mul after gate|up): the time a step actually pays, per LoRA
path: serial shrink/expand, shrink overlapped with the GEMM (LORAMUX_LORA_OVERLAP), the expands fused into the
ops that follow (LORAMUX_FUSED_LORA_MLP + LORAMUX_FUSED_LORA_QKV), and all of them.

    python -m loramux.loadtest.bench.bench_lora_linear [--rank 16] [--json out.json]

Per (T tokens, D distinct adapters): device time of the layer's GEMMs + those ops without adapters (base), and
the time each path adds to it, next to the LoRA byte floor (the D adapters' A and B read once, over the copy rate
measured in the same run) and issue 4's decode target (1.3x that floor plus one launch per group, a launch
counted as the time of an empty kernel in a CUDA graph, measured here too). All from CUDA graphs."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from loramux.kernels.fused_ops import silu_mul
from loramux.kernels.lora import build_lora_meta, gate_up_silu, lora_linear, qkv_rope_kv
from loramux.kernels.rope_kv import rope_write_kv
from loramux.loadtest.bench.bench_lora_kernels import GROUPS, build_layer, graph_time_us
from loramux.loadtest.bench.gpu_timing import copy_bandwidth

CASES = [(T, D) for T in (1, 8, 32, 64, 256, 2048) for D in (1, 8, 32, 64) if D <= T]
PATHS = {"serial": (False, False), "overlap": (True, False), "fused": (False, True), "all": (True, True)}
H, HKV, HEAD_DIM = 32, 8, 128


def layer_step(layer, ws, x, meta, rope, lora: bool, overlap: bool, fused: bool):
    """One layer's linear work: qkv + RoPE/KV write, o, gate_up + SiLU*mul, down (inputs reuse x / the act)."""
    T = x.shape[0]

    def run():
        out = []
        for grp, w in zip(layer, ws):
            inp = out[-1] if grp["name"] == "down" else x[:, :grp["K"]]
            if grp["name"] == "qkv":
                out.append(qkv_rope_kv(inp, w, None, grp["a"], grp["b"], grp["ranks"], grp["scales"], grp["offs"],
                                       meta, rope, backend="triton", rope_backend="triton", fused=fused,
                                       overlap=overlap) if lora else
                           rope_write_kv(torch.nn.functional.linear(inp, w), *rope, backend="triton"))
            elif not lora:
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
    cos = torch.rand(4096, HEAD_DIM, generator=g, device="cuda")
    cache = torch.zeros(160, 16, HKV, HEAD_DIM, dtype=dtype, device="cuda")  # 2560 token slots >= T
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
        pos = torch.arange(T, device="cuda")
        rope = (pos, cos, cos, cache, cache, pos, H, HKV, HEAD_DIM)  # KV written to the first T slots
        reps = 20 if T <= 256 else 5
        base = graph_time_us(layer_step(layer, ws, x, meta, rope, False, False, False), reps=reps)
        added = {p: graph_time_us(layer_step(layer, ws, x, meta, rope, True, ov, fu), reps=reps) - base
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
