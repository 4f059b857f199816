"""CPU adapter benchmark: load + validate time from disk, and the LoRA path's cost per decode step vs base.

python -m loadtest.bench.bench_adapters_cpu [--batch 32] [--steps 30]
Uses the embedded demo model and its demo adapters (built locally in a temp dir).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramux.adapters.demo import write_demo_adapters
from loramux.adapters.loader import load_adapter
from loramux.server.adapter_service import AdapterService
from loramux.server.engine.request import SamplingParams
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.demo import ensure_demo_model
from loramux.server.models.model_config import ModelConfig
from loramux.server.runtime import attach_adapters, build_engine


def decode_step_ms(model_dir: Path, cfg: ModelConfig, adapters: dict, names: list, batch: int, steps: int,
                   reg: Path) -> float:
    sched = SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=4096, max_model_len=512, max_loras=8)
    engine = build_engine(model_dir, cfg, torch.float32, torch.device("cpu"), 512, batch * 32, sched, [],
                          kernel_backend="torch")
    svc = AdapterService(reg, cfg.raw, torch.float32, 8, 64, 16)
    for n, p in adapters.items():
        svc.register_dir(n, p)
    attach_adapters(engine, svc)
    params = SamplingParams(max_tokens=steps + 5, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", [(5 * i + j) % 250 + 1 for j in range(32)], params, names[i % len(names)])
    times = []
    while engine.has_work():
        engine.step()
        if engine.last_step.num_tokens == batch:
            times.append(engine.runner.last_forward_s)
    return statistics.median(times[2:]) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = ensure_demo_model(tmp)
        cfg = ModelConfig.from_dir(model_dir)
        adapters = write_demo_adapters(tmp / "ad", model_dir)
        from loramux.adapters.spec import BaseModelSpec
        spec = BaseModelSpec.from_hf_config(cfg.raw)
        for name, path in adapters.items():
            load_adapter(path, spec)  # warm the page cache; we time validation + parsing, not the disk
            t = []
            for _ in range(10):
                t0 = time.perf_counter()
                ad = load_adapter(path, spec)
                t.append(time.perf_counter() - t0)
            print(f"load + validate {name:>13} ({ad.nbytes / 1e6:.2f} MB fp32): "
                  f"{statistics.median(t) * 1e3:.2f} ms", flush=True)
        base = decode_step_ms(model_dir, cfg, adapters, [None], args.batch, args.steps, tmp / "r0")
        print(f"decode step, batch {args.batch}, base only:           {base:.2f} ms")
        for label, names in [("one adapter", ["demo-all-r8"]), ("3 adapters + base", list(adapters) + [None])]:
            ms = decode_step_ms(model_dir, cfg, adapters, names, args.batch, args.steps, tmp / label.replace(" ", ""))
            print(f"decode step, batch {args.batch}, {label:>18}: {ms:.2f} ms  ({ms / base:.2f}x base)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
