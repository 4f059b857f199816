"""GPU engine benchmark: loramux vs HF transformers + PEFT on a named shape with random weights, mixed adapters.

python -m loadtest.bench.bench_gpu_vs_peft --shape llama3-8b --batch 32 --prompt-len 128 --new-tokens 64 \
    --adapters 0,1,4,32 --rank 16 [--skip-hf] [--enforce-eager] [--profile] [--host-profile] [--json out.json]
Prints tok/s, decode step time, the step's bandwidth floor and both ratios (to the floor, to HF+PEFT).
Floor of a decode step = (weights + KV read + distinct adapters' A/B bytes) / copy bandwidth (measured here).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from loramux.adapters.loader import LoadedAdapter
from loramux.adapters.spec import MODULES
from loramux.loadtest.bench.gpu_timing import copy_bandwidth
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.shapes import SHAPES, shape_config
from loramux.server.runtime import attach_adapters, build_engine


def random_adapter(spec, rank: int, seed: int, dtype) -> LoadedAdapter:
    g = torch.Generator().manual_seed(seed)
    weights, scales = {}, {}
    for layer in range(spec.num_layers):
        for m in MODULES:
            fin, fout = spec.modules[m]
            a = (torch.randn(rank, fin, generator=g) / fin ** 0.5).to(dtype)
            b = (torch.randn(fout, rank, generator=g) * 0.01).to(dtype)
            weights[(layer, m)], scales[(layer, m)] = (a, b), 2.0
    nbytes = sum(a.nbytes + b.nbytes for a, b in weights.values())
    return LoadedAdapter(f"a{seed}", None, weights, scales, rank, nbytes, spec.num_layers)


def run_ours(args, cfg, n_adapters: int, bw: float, adapters: list) -> dict:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    max_len = args.prompt_len + args.new_tokens + 16
    blocks = args.batch * (-(-max_len // 16)) + 8
    sched = SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=max(4096, args.batch * args.prompt_len),
                            max_model_len=max_len, max_loras=max(1, args.max_loras))
    engine = build_engine(None, cfg, dtype, dev, max_len, blocks, sched, [], kernel_backend="auto")
    import tempfile
    svc = AdapterService(Path(tempfile.mkdtemp()), cfg.raw, dtype, max(1, args.max_loras),
                         args.max_lora_rank or args.rank, 1024)
    attach_adapters(engine, svc)
    for ad in adapters:
        svc.cache.put(ad.adapter_id, ad)  # straight into the CPU tier: the gate copies them into GPU slots
    if not args.enforce_eager:
        engine.runner.enable_cuda_graphs(args.batch)
    g = torch.Generator().manual_seed(0)
    warm = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):  # warm-up: Triton JIT compiles and adapter slot loads stay out of the timing
        engine.add_request(f"w{i}", [1] * args.prompt_len, warm, adapters[i % n_adapters].adapter_id
                           if n_adapters else None)
    while engine.has_work():
        engine.step()
    params = SamplingParams(max_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                            ignore_eos=True)
    for i in range(args.batch):
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
        aid = adapters[i % n_adapters].adapter_id if n_adapters else None
        engine.add_request(f"r{i}", prompt, params, aid)
    torch.cuda.synchronize()
    steps, t0, produced = [], time.perf_counter(), 0
    while engine.has_work():
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        produced += sum(len(o.new_token_ids) for o in outs)
        if engine.last_step.num_tokens == args.batch and len(outs) == args.batch:
            steps.append(dt)
    wall = time.perf_counter() - t0
    step = statistics.median(steps[3:] or steps)
    if args.profile:
        profile_decode(engine, args, adapters, n_adapters)
    if args.host_profile:
        profile_host(engine, args, adapters, n_adapters)
    weight_bytes = engine.runner.weight_bytes
    ctx = args.prompt_len + args.new_tokens / 2
    kv_read = args.batch * ctx * 2 * cfg.num_layers * cfg.kv_size * 2
    ad_bytes = sum(a.nbytes for a in adapters[:n_adapters])
    floor = (weight_bytes + kv_read + ad_bytes) / bw
    res = {"system": "loramux", "adapters": n_adapters, "tok_s": produced / wall, "decode_step_ms": step * 1e3,
           "floor_ms": floor * 1e3, "step_over_floor": step / floor, "decode_tok_s": args.batch / step}
    del engine, svc
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_decode(engine, args, adapters, n_adapters: int) -> None:
    """Top device kernels over a few decode steps: where the time above the floor goes."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"p{i}", [2] * args.prompt_len, params, adapters[i % n_adapters].adapter_id
                           if n_adapters else None)
    engine.step()  # prefill outside the profile
    runner, launches = engine.runner, []
    launch = runner.launch  # counted: with steps launched ahead, 5 step() calls queue 6 forwards
    runner.launch = lambda *a, **k: launches.append(1) or launch(*a, **k)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    del runner.launch
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    from loramux.loadtest.bench.kernel_categories import summarize

    print(summarize(prof, len(launches), f"decode, batch {args.batch}, D={n_adapters}, {len(launches)} steps"))
    while engine.has_work():
        engine.step()


def _print_top(prof, title: str) -> None:
    import pstats

    print(f"\n=== host profile: {title}; top 25 functions by own time (tottime) ===", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def profile_host(engine, args, adapters, n_adapters: int) -> None:
    """cProfile of the engine's host side (the timed run above is over: everything is warm): ~20 decode steps
    (CUDA graphs unless --enforce-eager), then 3 eager mixed steps (4 new prompts' prefill scheduled with the
    running decodes). The sampler's .tolist() waits for the GPU: its time is mostly device time."""
    import cProfile

    B, P = args.batch, args.prompt_len
    cap = args.new_tokens + 16  # max_model_len - prompt_len: the most tokens a request may generate
    def aid(i: int):
        return adapters[i % n_adapters].adapter_id if n_adapters else None

    def is_decode(k: int) -> bool:
        return engine.last_step.num_requests == k == engine.last_step.num_tokens

    def until(cond, limit: int = 200) -> None:
        for _ in range(limit):
            if cond():
                return
            engine.step()

    params = SamplingParams(max_tokens=min(24, cap), temperature=0.0, ignore_eos=True)
    for i in range(B):
        engine.add_request(f"hd{i}", [3] * P, params, aid(i))
    engine.step()
    until(lambda: is_decode(B))  # prefill (and adapter loads) outside the profile
    engine.step()
    prof, decode = cProfile.Profile(), 0
    for _ in range(20):
        if not engine.has_work():
            break
        prof.enable()
        engine.step()
        prof.disable()
        decode += is_decode(B)
    mode = "eager" if args.enforce_eager else "CUDA graphs"
    _print_top(prof, f"D={n_adapters}, {decode} decode steps of {B} sequences ({mode})")
    until(lambda: not engine.has_work(), 10**6)

    if B <= 4:
        return
    params = SamplingParams(max_tokens=min(12, cap), temperature=0.0, ignore_eos=True)
    for i in range(B - 4):
        engine.add_request(f"hm{i}", [5] * P, params, aid(i))
    engine.step()
    until(lambda: is_decode(B - 4))
    prof, mixed = cProfile.Profile(), 0
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for r in range(4):  # round 0 warms up the mixed shapes
        new = [f"hn{r}-{j}" for j in range(4)]
        for j, rid in enumerate(new):
            engine.add_request(rid, [6 + r] * P, short, aid(B - 4 + j))
        if r:
            prof.enable()
        engine.step()
        prof.disable()
        mixed += r > 0 and engine.last_step.num_tokens > engine.last_step.num_requests
        until(lambda: not any(rid in engine.requests for rid in new))
    _print_top(prof, f"D={n_adapters}, {mixed} eager mixed steps (4 prefills of {P} tokens + {B - 4} decodes)")
    until(lambda: not engine.has_work(), 10**6)


def run_hf(args, n_adapters: int, new_tokens: int) -> dict:
    import peft
    import transformers as tf

    hf_cfg = tf.LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    names = None
    if n_adapters:
        lcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(MODULES),
                               init_lora_weights=False)
        model = peft.get_peft_model(model, lcfg, adapter_name="a0")
        for i in range(1, n_adapters):
            model.add_adapter(f"a{i}", lcfg)
        model.eval()
        names = [f"a{i % n_adapters}" for i in range(args.batch)]
    ids = torch.randint(0, hf_cfg.vocab_size, (args.batch, args.prompt_len), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if names:
        kw["adapter_names"] = names
    with torch.no_grad():
        model.generate(input_ids=ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(input_ids=ids, **kw)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"system": "hf+peft", "adapters": n_adapters, "tok_s": args.batch * new_tokens / wall,
            "new_tokens": new_tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", default="0,1,4,32")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--max-lora-rank", type=int, default=0,
                    help="slot rank (the server's --max-lora-rank; default: --rank, so no padding is read around)")
    ap.add_argument("--hf-new-tokens-slow", type=int, default=16, help="HF tokens when >= 4 adapters (it is slow)")
    ap.add_argument("--temperature", type=float, default=0.0, help="loramux rows' sampling (HF stays greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of 5 decode steps")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the host side of ~20 decode steps and 3 eager mixed steps (top 25 by tottime)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cfg = shape_config(args.shape)
    bw = copy_bandwidth(2 << 30)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    counts = [int(x) for x in args.adapters.split(",")]
    from loramux.adapters.spec import BaseModelSpec
    spec = BaseModelSpec.from_hf_config(cfg.raw, max(args.rank, args.max_lora_rank), "bfloat16")
    adapters = [random_adapter(spec, args.rank, i, torch.bfloat16) for i in range(max(counts))]
    rows = []
    for d in counts:
        r = run_ours(args, cfg, d, bw, adapters)
        rows.append(r)
        print(f"loramux  D={d:>3}: {r['tok_s']:8.1f} tok/s (end to end)  decode step {r['decode_step_ms']:6.2f} ms "
              f"= {r['decode_tok_s']:7.1f} tok/s, floor {r['floor_ms']:5.2f} ms, x{r['step_over_floor']:.2f} "
              "of floor", flush=True)
    if not args.skip_hf:
        for d in counts:
            r = run_hf(args, d, args.new_tokens if d < 4 else args.hf_new_tokens_slow)
            rows.append(r)
            print(f"hf+peft  D={d:>3}: {r['tok_s']:8.1f} tok/s ({r['new_tokens']} new tokens)", flush=True)
        print("\n| adapters | loramux tok/s | HF+PEFT tok/s | speed-up | decode step / floor |")
        print("|---|---|---|---|---|")
        for d in counts:
            ours = next(r for r in rows if r["system"] == "loramux" and r["adapters"] == d)
            hf = next(r for r in rows if r["system"] == "hf+peft" and r["adapters"] == d)
            print(f"| {d} | {ours['tok_s']:.0f} | {hf['tok_s']:.0f} | {ours['tok_s'] / hf['tok_s']:.1f}x | "
                  f"{ours['step_over_floor']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"copy_bw": bw, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
