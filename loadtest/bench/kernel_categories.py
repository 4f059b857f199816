"""Device time of profiled steps by kernel category (GEMM, attention, LoRA shrink / expand, norm, ...), per step:
where a decode step's time above the floor goes, comparable between runs with and without adapters."""
from __future__ import annotations

# Triton kernels appear in a profile under their function names (kernels/*.py); cuBLAS GEMMs under vendor names.
TRITON = {"_shrink_kernel": "LoRA shrink", "_expand_kernel": "LoRA expand", "_fused_kernel": "LoRA expand",
          "_expand_silu_kernel": "LoRA expand + SiLU*mul", "_expand_rope_kv_kernel": "LoRA expand + RoPE + KV",
          "_rms_norm_kernel": "add + RMSNorm", "_silu_mul_kernel": "SiLU*mul", "_rope_kv_kernel": "RoPE + KV write",
          "_write_kv_kernel": "RoPE + KV write", "_decode_kernel": "attention", "_prefill_kernel": "attention",
          "_reduce_kernel": "attention", "_gumbel_argmax_kernel": "sampling", "_top_p_kernel": "sampling"}
GEMM_MARKERS = ("gemm", "nvjet", "cutlass", "xmma", "cublas")


def category(name: str) -> str:
    if name in TRITON:
        return TRITON[name]
    return "GEMM" if any(m in name.lower() for m in GEMM_MARKERS) else "other"


def by_category(kernels, steps: int) -> dict[str, tuple[float, float]]:
    """kernels: (name, device microseconds summed over the profile, launches) per kernel name -> category ->
    (microseconds per step, launches per step), largest first."""
    out: dict[str, list[float]] = {}
    for name, us, count in kernels:
        c = out.setdefault(category(name), [0.0, 0.0])
        c[0] += us / steps
        c[1] += count / steps
    return dict(sorted(((k, (v[0], v[1])) for k, v in out.items()), key=lambda kv: -kv[1][0]))


def profiled_kernels(prof) -> list[tuple[str, float, int]]:
    """(name, device us, count) of the device kernels in a torch.profiler run (CPU ops' totals would count their
    kernels twice)."""
    return [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages()
            if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0]


def format_categories(cats: dict[str, tuple[float, float]], title: str) -> str:
    total = sum(us for us, _ in cats.values())
    lines = [f"{title}: {total:.0f} us of kernels per step", "| category | us per step | share | kernels per step |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {us:.1f} | {us / total:.0%} | {n:.0f} |" for k, (us, n) in cats.items()] if total else []
    return "\n".join(lines)


def summarize(prof, steps: int, title: str) -> str:
    """The category table of a torch.profiler run over `steps` steps."""
    return format_categories(by_category(profiled_kernels(prof), steps), title)


def top_kernels(prof, steps: int, n: int = 12) -> str:
    """The n kernels with the most device time per step (names shortened), for what the categories hide."""
    rows = sorted(profiled_kernels(prof), key=lambda k: -k[1])[:n]
    lines = ["| kernel | us per step | launches per step |", "|---|---|---|"]
    return "\n".join(lines + [f"| {name[:90]} | {us / steps:.1f} | {count / steps:.0f} |" for name, us, count in rows])

