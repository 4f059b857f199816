"""Command line: `python -m loadtest run | make-adapters | compare` (also the loramux-loadtest script)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from .client import RequestOptions
from .metrics import parse_goodput, per_adapter, summarize
from .report import compare, format_table, load_results, write_results
from .runner import run_plan
from .workload import build_workload, parse_adapter_dist

API_KEY_ENV = "LORAMUX_API_KEY"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--base-model", help="the base model's name (default: first id from GET /v1/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loramux-loadtest", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workload and report latency and throughput")
    _add_common(run)
    run.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    run.add_argument("--num-requests", type=int, default=100)
    run.add_argument("--request-rate", type=float, default=float("inf"),
                     help="requests/s released as a Poisson process; inf (default) releases all at once")
    run.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    run.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    run.add_argument("--length-dist", choices=("fixed", "sharegpt"), default="fixed",
                     help="fixed lengths, or synthetic ShareGPT-like lognormal lengths (generated locally)")
    run.add_argument("--input-len", type=int, help="prompt words (~tokens); with sharegpt the median (110)")
    run.add_argument("--output-len", type=int, help="max_tokens; with sharegpt the median (130); fixed: 128")
    run.add_argument("--range-ratio", type=float, default=0.0, help="fixed lengths vary uniformly by +-this")
    run.add_argument("--adapters", help="comma-separated adapter ids (the request's model field)")
    run.add_argument("--adapter-count", type=int, help="use adapters PREFIX0..PREFIX{N-1}")
    run.add_argument("--adapter-prefix", default="lt-")
    run.add_argument("--adapter-dist", default="uniform", help="uniform | single | zipf:ALPHA")
    run.add_argument("--base-fraction", type=float, default=0.0, help="share of requests sent to the base model")
    run.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:50 e2el:10000")
    run.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true so lengths are exact")
    run.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="stream (default; TTFT and ITL need it)")
    run.add_argument("--temperature", type=float, default=0.0)
    run.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    run.add_argument("--metric-percentiles", default="50,90,99")
    run.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent one by one first")
    run.add_argument("--out", help="directory for results.json and PNG plots")
    run.add_argument("--top-adapters", type=int, default=10, help="adapters shown in per-adapter stats")
    run.add_argument("--label", help="a name for this run, stored in results.json")
    run.add_argument("--no-progress", action="store_true")

    mk = sub.add_parser("make-adapters", help="build random PEFT adapters for the served model and upload them")
    _add_common(mk)
    mk.add_argument("--count", type=int, default=4)
    mk.add_argument("--ranks", default="8,16,32", help="ranks, cycled over the adapters")
    mk.add_argument("--targets", default="q_proj,v_proj", help="modules, e.g. q_proj,k_proj,v_proj,o_proj")
    mk.add_argument("--prefix", default="lt-", help="adapter ids are PREFIX0..PREFIX{N-1}")
    mk.add_argument("--alpha", type=float, help="lora_alpha (default: the rank, so scale 1)")
    mk.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    mk.add_argument("--init-scale", type=float, default=0.01, help="std of the random B matrices")
    mk.add_argument("--out-dir", default="out/adapters", help="where the adapter folders are written")
    mk.add_argument("--no-upload", action="store_true", help="only write the files")
    mk.add_argument("--replace", action="store_true", help="on 409, delete the existing adapter and upload")

    cmp_ = sub.add_parser("compare", help="side-by-side table of two results.json files")
    cmp_.add_argument("a", help="results.json (or its directory)")
    cmp_.add_argument("b", help="results.json (or its directory)")
    cmp_.add_argument("--labels", help="two comma-separated names (default: the file's labels or A,B)")
    return ap


def fetch_base_model(base_url: str, api_key: str | None, timeout: float = 30.0) -> str:
    """The first model id listed by GET /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = httpx.get(url, headers=headers, timeout=timeout, trust_env=False)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise SystemExit(f"error: cannot read the base model from {url} ({type(e).__name__}: {e}); "
                         "pass --base-model") from None


def adapter_list(args: argparse.Namespace) -> list[str]:
    if args.adapters and args.adapter_count:
        raise SystemExit("error: give --adapters or --adapter-count, not both")
    if args.adapters:
        return [a.strip() for a in args.adapters.split(",") if a.strip()]
    return [f"{args.adapter_prefix}{i}" for i in range(args.adapter_count or 0)]


def run_config(args: argparse.Namespace, base_model: str, adapters: list[str]) -> dict[str, Any]:
    """The run's settings for results.json (the API key is never stored)."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("api_key", "func")}
    cfg["request_rate"] = str(args.request_rate) if args.request_rate == float("inf") else args.request_rate
    cfg.update(api_key_set=bool(args.api_key), base_model=base_model, adapter_ids=adapters)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    try:
        parse_adapter_dist(args.adapter_dist)
        slo = parse_goodput(args.goodput)
        pcts = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.num_requests <= 0:
        raise SystemExit("error: --num-requests must be >= 1")
    adapters = adapter_list(args)
    base_model = args.base_model or fetch_base_model(args.base_url, args.api_key)
    plan_args = dict(
        seed=args.seed, base_model=base_model, adapters=adapters, adapter_dist=args.adapter_dist,
        base_fraction=args.base_fraction, length_dist=args.length_dist, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, request_rate=args.request_rate,
        burstiness=args.burstiness,
    )
    try:
        specs = build_workload(args.num_requests, **plan_args)
        warm = build_workload(args.warmup, **{**plan_args, "seed": args.seed + 1}) if args.warmup > 0 else []
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    opts = RequestOptions(args.base_url, args.endpoint, args.api_key, args.stream, args.ignore_eos,
                          args.temperature, dict(args.extra_body))
    print(f"{args.num_requests} requests to {opts.url} (base model {base_model}, {len(adapters)} adapters, "
          f"{args.adapter_dist}, rate {args.request_rate}, concurrency {args.max_concurrency or 'unlimited'})",
          file=sys.stderr)
    result = asyncio.run(run_plan(specs, opts, args.max_concurrency, args.timeout, not args.no_progress, warm))
    summary = summarize(result.records, result.duration, pcts, slo)
    summary["interrupted"] = result.interrupted
    print(format_table(summary))
    if args.out:
        out = Path(args.out)
        path = write_results(out, run_config(args, base_model, adapters), summary,
                             per_adapter(result.records, args.top_adapters), result.records)
        from .plots import write_plots

        pngs = write_plots(out, result.records, result.duration, args.top_adapters)
        print(f"wrote {path}" + "".join(f", {p.name}" for p in pngs), file=sys.stderr)
    return 130 if result.interrupted else (0 if summary["completed"] else 1)


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_results(args.a), load_results(args.b)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.labels:
        labels = tuple(x.strip() for x in args.labels.split(",", 1))
        if len(labels) != 2:
            raise SystemExit("error: --labels needs two names, e.g. loramux,vllm")
    else:
        labels = tuple(d.get("config", {}).get("label") or n for d, n in ((a, "A"), (b, "B")))
    print(compare(a, b, labels))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "make-adapters":
            from .adapters import make_adapters

            return make_adapters(args)
        return cmd_compare(args)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
