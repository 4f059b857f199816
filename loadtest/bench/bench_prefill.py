"""GPU prefill benchmark (issue 5): TTFT of one long prompt without and with an adapter, and the achieved matmul
rate of the prefill against the bf16 matmul rate measured in the same run.

python -m loramux.loadtest.bench.bench_prefill --shape llama3-8b --prompt-len 2048 --rank 16 [--json out.json]
TTFT = wall time of the engine step that prefills the whole prompt and samples its first token, replayed from a
mixed-step CUDA graph as the server does by default (--graphs off: eager, as measured up to session 6, where the
Python launch path of ~200 extra LoRA kernels per step is part of the adapter's cost).
Prefill rate = (2 x non-embedding weights x tokens + causal attention FLOPs) / TTFT.
Matmul rate = the best of a few large bf16 GEMMs (the prompt's own token count x the model's MLP shapes included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramux.adapters.spec import BaseModelSpec
from loramux.loadtest.bench.bench_gpu_vs_peft import random_adapter
from loramux.loadtest.bench.gpu_timing import cuda_time_us
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.shapes import SHAPES, shape_config
from loramux.server.runtime import attach_adapters, build_engine


def matmul_rate(tokens: int, cfg) -> float:
    """FLOP/s: the best of bf16 GEMMs shaped like this prefill's projections and one large square GEMM."""
    best = 0.0
    for m, k, n in ((tokens, cfg.hidden_size, cfg.intermediate_size * 2), (tokens, cfg.intermediate_size,
                                                                          cfg.hidden_size), (8192, 8192, 8192)):
        a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        us = cuda_time_us(lambda: torch.nn.functional.linear(a, b), 20)
        best = max(best, 2 * m * k * n / (us * 1e-6))
    return best


def prefill_flops(cfg, weight_params: int, tokens: int) -> float:
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * tokens * (tokens + 1) / 2  # QK^T and PV, causal
    return 2 * (weight_params - embed) * tokens + 2 * cfg.vocab_size * cfg.hidden_size + attn  # + one logits row


def profile_prefill(engine, adapter_ids: list, T: int, params) -> None:
    """Device kernel time by category of one whole-prompt prefill step per adapter id (None = base)."""
    from torch.profiler import ProfilerActivity, profile

    from loramux.loadtest.bench.kernel_categories import summarize, top_kernels

    for aid in adapter_ids:
        engine.add_request(f"prof-{aid}", [3] * T, params, aid)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        print(summarize(prof, 1, f"prefill {T} tokens, adapter {aid}"))
        print(top_kernels(prof, 1))
        while engine.has_work():
            engine.step()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--graphs", choices=("on", "off"), default="on",
                    help="mixed-step CUDA graphs for the prefill step (the server's --mixed-step-graphs)")
    ap.add_argument("--profile", action="store_true", help="kernel time by category of one prefill step each way")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cfg = shape_config(args.shape)
    dev, dtype, T = torch.device("cuda"), torch.bfloat16, args.prompt_len
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=T, max_model_len=T + 16, max_loras=2)
    engine = build_engine(None, cfg, dtype, dev, T + 16, 4 * (-(-(T + 16) // 16)) + 8, sched, [],
                          kernel_backend="auto")
    spec = BaseModelSpec.from_hf_config(cfg.raw, args.rank, "bfloat16")
    svc = AdapterService(Path(tempfile.mkdtemp()), cfg.raw, dtype, 2, args.rank, 4)
    attach_adapters(engine, svc)
    if args.graphs == "on":
        engine.runner.enable_cuda_graphs(sched.max_num_seqs, T)
    ad = random_adapter(spec, args.rank, 0, dtype)
    svc.cache.put(ad.adapter_id, ad)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    times = {None: [], ad.adapter_id: []}
    for i in range(args.repeats + 1):  # the first round compiles kernels and loads the slot: not counted
        for aid in times:
            engine.add_request(f"p{i}-{aid}", torch.randint(1, cfg.vocab_size, (T,), generator=g).tolist(), params,
                               aid)
            while True:  # an adapter's first step may only start its slot copy
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs = engine.step()
                dt = time.perf_counter() - t0
                if engine.last_step.num_tokens:
                    break
            assert engine.last_step.num_tokens == T and outs and outs[0].new_token_ids, "prompt not prefilled whole"
            while engine.has_work():
                engine.step()
            if i:
                times[aid].append(dt)
    if args.profile:
        profile_prefill(engine, [None, ad.adapter_id], T, params)
    base, lora = statistics.median(times[None]), statistics.median(times[ad.adapter_id])
    flops = prefill_flops(cfg, engine.runner.weight_bytes // 2, T)
    rate = matmul_rate(T, cfg)
    out = {"shape": args.shape, "prompt_len": T, "rank": args.rank, "graphs": args.graphs,
           "ttft_base_ms": base * 1e3, "ttft_adapter_ms": lora * 1e3, "adapter_over_base": lora / base,
           "matmul_tflops": rate / 1e12,
           "prefill_tflops_base": flops / base / 1e12, "prefill_tflops_adapter": flops / lora / 1e12,
           "base_over_matmul": flops / base / rate}
    print(json.dumps(out, indent=1))
    mode = "mixed-step graphs" if args.graphs == "on" else "eager"
    print(f"TTFT {T} tokens ({mode}): base {base * 1e3:.1f} ms, adapter {lora * 1e3:.1f} ms = x{lora / base:.3f} "
          f"(target <= 1.10); prefill {flops / base / 1e12:.0f} TFLOP/s = {flops / base / rate:.2f} of the measured "
          f"bf16 matmul rate {rate / 1e12:.0f} TFLOP/s (target >= 0.60)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    svc.close()
    return out


if __name__ == "__main__":
    main()
