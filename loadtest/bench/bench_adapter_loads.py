"""Disk -> CPU adapter load paths, on any host (no GPU needed): a PEFT folder read, validated, cast and packed vs its
packed file memory-mapped (adapters/packed_store.py), and the staging copy every pageable adapter then takes into
a reused pinned buffer on its way to a GPU slot (runner/pinned_staging.py; a pageable buffer off CUDA).

python -m loramux.loadtest.bench.bench_adapter_loads --shape llama3-8b --ranks 16,64 [--repeat 5] [--json out.json]
Random fp32 PEFT folders on all 7 projections, loaded to bf16 (as on a GPU host); page cache warm (every path runs
once before the timed repeats). Prints medians and the mapped / folder ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramux.adapters.demo import write_random_adapter
from loramux.adapters.loader import load_adapter
from loramux.adapters.packed_store import PackedStore
from loramux.adapters.spec import MODULES, BaseModelSpec
from loramux.server.models.shapes import shape_config


def median_ms(fn, repeat: int) -> float:
    fn()  # warm: page cache, allocator
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(raw: dict, r: int, tmp: Path, repeat: int) -> dict:
    folder = write_random_adapter(tmp / f"r{r}", raw, r, 2.0 * r, list(MODULES), seed=r)
    spec = BaseModelSpec.from_hf_config(raw, max(64, r), "bfloat16")
    store = PackedStore(tmp / "packed", spec, torch.bfloat16, 1 << 40)
    fresh = load_adapter(folder, spec, torch.bfloat16)
    store.save(folder, store.key(folder), fresh)
    size = fresh.packed.buffer.numel()
    pinned = torch.cuda.is_available()
    staging = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)

    def mapped():
        ad, _ = store.load(folder, None)
        assert ad is not None
        return ad

    out = {"rank": r, "packed_mb": size / 1e6, "file_mb": (folder / "adapter_model.safetensors").stat().st_size / 1e6,
           "folder_load_ms": median_ms(lambda: load_adapter(folder, spec, torch.bfloat16), repeat),
           "mapped_load_ms": median_ms(mapped, repeat),
           "stage_from_fresh_ms": median_ms(lambda: fresh.packed.copied_to(staging), repeat),
           # a fresh mapping each time: the copy's page walk is part of what a mapped adapter costs
           "map_and_stage_ms": median_ms(lambda: mapped().packed.copied_to(staging), repeat),
           "staging_pinned": pinned}
    out["mapped_over_folder"] = out["mapped_load_ms"] / out["folder_load_ms"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = shape_config(args.shape).raw
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for r in (int(x) for x in args.ranks.split(",")):
            print(f"rank {r}: writing and timing ...", flush=True)
            row = measure(raw, r, Path(d), args.repeat)
            rows.append(row)
            print(f"  {row['packed_mb']:.0f} MB packed bf16 ({row['file_mb']:.0f} MB fp32 file): folder load "
                  f"{row['folder_load_ms']:.1f} ms, mapped {row['mapped_load_ms']:.2f} ms "
                  f"(ratio {row['mapped_over_folder']:.3f}); staging copy {row['stage_from_fresh_ms']:.1f} ms "
                  f"from memory, {row['map_and_stage_ms']:.1f} ms map + copy", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "threads": torch.get_num_threads(), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
