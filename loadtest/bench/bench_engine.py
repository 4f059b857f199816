"""Offline engine benchmark: tokens/s, step time and the engine's own CPU overhead per step, by batch size.

python -m loadtest.bench.bench_engine [--shapes demo,tiny] [--batches 1,8,32,64] [--device cpu] [--json out.json]
Overhead = step time - model forward (scheduling, tensor prep, sampling, bookkeeping) + incremental
detokenization of every new token, i.e. everything the engine adds on top of the model's math.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramux.server.engine.detokenizer import IncrementalDetokenizer
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.demo import ensure_demo_model
from loramux.server.models.model_config import ModelConfig
from loramux.server.models.shapes import shape_config
from loramux.server.models.tokenizer import Tokenizer
from loramux.server.runtime import build_engine


def _engine(shape: str, device: torch.device, dtype: torch.dtype, max_seqs: int, cache: Path):
    if shape == "demo":
        model_dir = ensure_demo_model(cache)
        cfg, tok = ModelConfig.from_dir(model_dir), Tokenizer.from_dir(model_dir)
    else:
        model_dir, cfg, tok = None, shape_config(shape), Tokenizer.from_dir(ensure_demo_model(cache))
    sched = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=8192, max_model_len=1024)
    blocks = max_seqs * 1024 // 16
    return build_engine(model_dir, cfg, dtype, device, 1024, blocks, sched, [], kernel_backend="torch"), tok, cfg


def run_one(shape: str, batch: int, prompt_len: int, new_tokens: int, device, dtype, cache: Path,
            sampled: bool) -> dict:
    engine, tok, cfg = _engine(shape, device, dtype, max(batch, 1), cache)
    engine.runner.sync_timing = True  # last_forward_s = the forward alone (a sync after it), so overhead excludes it
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True,
                            temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else 1.0)
    detoks = {}
    for i in range(batch):
        prompt = [(7 * i + j) % min(cfg.vocab_size, 256) for j in range(prompt_len)]
        engine.add_request(f"b{i}", prompt, params)
        detoks[f"b{i}"] = IncrementalDetokenizer(tok, prompt)
    steps, t_start, generated = [], time.perf_counter(), 0
    while engine.has_work():
        t0 = time.perf_counter()
        outs = engine.step()
        for o in outs:  # detokenization is engine-side work too (the async layer does it per token)
            d = detoks.get(o.request_id)
            if d is not None and all(t < 256 for t in o.new_token_ids):
                d.push(o.new_token_ids)
        total = time.perf_counter() - t0
        generated += sum(len(o.new_token_ids) for o in outs)
        if engine.last_step.num_tokens == batch:  # decode steps only
            steps.append((total, engine.runner.last_forward_s))
    wall = time.perf_counter() - t_start
    steps = steps[2:] or steps  # skip warm-up
    step_ms = statistics.median(s for s, _ in steps) * 1e3
    overhead_ms = statistics.median(s - f for s, f in steps) * 1e3
    return {"shape": shape, "batch": batch, "sampled": sampled, "tokens_per_s": generated / wall,
            "step_ms": step_ms, "forward_ms": step_ms - overhead_ms, "overhead_ms": overhead_ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="demo,tiny")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for shape in args.shapes.split(","):
            for b in (int(x) for x in args.batches.split(",")):
                for sampled in (False, True):
                    r = run_one(shape, b, args.prompt_len, args.new_tokens, device, dtype, Path(cache), sampled)
                    rows.append(r)
                    print(f"{r['shape']:>6} batch {r['batch']:>3} {'sampled' if sampled else 'greedy ':>7}: "
                          f"{r['tokens_per_s']:9.1f} tok/s  step {r['step_ms']:7.2f} ms  forward "
                          f"{r['forward_ms']:7.2f} ms  engine overhead {r['overhead_ms']:6.3f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
