"""Summary metrics: throughput, TTFT/TPOT/ITL/E2EL statistics, goodput (DistServe) and per-adapter latency."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import numpy as np

from .client import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")
UNFINISHED = ("not_sent", "cancelled")  # neither a success nor a failure


def stats_ms(values_s: Iterable[float], percentiles: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
    """mean/std/median/min/max and the given percentiles (linear interpolation), seconds in, ms out;
    zeros for an empty input, as vllm bench prints them."""
    arr = np.asarray(list(values_s), dtype=np.float64) * 1000.0
    out: dict[str, float] = {"count": float(arr.size)}
    if arr.size == 0:
        out.update(mean=0.0, std=0.0, median=0.0, min=0.0, max=0.0)
        out.update({f"p{_pname(p)}": 0.0 for p in percentiles})
        return out
    out.update(
        mean=float(arr.mean()),
        std=float(arr.std()),
        median=float(np.median(arr)),
        min=float(arr.min()),
        max=float(arr.max()),
    )
    out.update({f"p{_pname(p)}": float(np.percentile(arr, p)) for p in percentiles})
    return out


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def parse_goodput(items: Iterable[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slo: dict[str, float] = {}
    for item in items or []:
        key, sep, val = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"goodput SLO must look like ttft:MS, tpot:MS or e2el:MS, not {item!r}")
        try:
            ms = float(val)
        except ValueError:
            raise ValueError(f"bad milliseconds in goodput SLO {item!r}") from None
        if ms <= 0:
            raise ValueError(f"goodput SLO must be > 0 ms: {item!r}")
        slo[key] = ms
    return slo


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """True if rec succeeded and every SLO holds; a missing TPOT (one output token) counts as 0."""
    if not rec.success:
        return False
    values = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2el": rec.e2el}
    for key, limit_ms in slo.items():
        v = values[key]
        if v is None or v * 1000.0 > limit_ms:
            return False
    return True


def metric_values(records: Iterable[RequestRecord], metric: str) -> list[float]:
    """Seconds for one metric over successful records (ITL: every gap of every request)."""
    ok = [r for r in records if r.success]
    if metric == "itl":
        return [g for r in ok for g in r.itl]
    vals = (getattr(r, metric) for r in ok)
    return [v for v in vals if v is not None]


def summarize(
    records: list[RequestRecord],
    duration: float,
    percentiles: Iterable[float] = (50, 90, 99),
    slo: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Everything the table prints, as a JSON-able dict."""
    percentiles = tuple(percentiles)
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success and r.status not in UNFINISHED]
    dur = max(duration, 1e-9)
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    s: dict[str, Any] = {
        "planned_requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "failed_by_status": {str(k): v for k, v in sorted(Counter(str(r.status) for r in failed).items())},
        "cancelled": sum(r.status == "cancelled" for r in records),
        "not_sent": sum(r.status == "not_sent" for r in records),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "usage_reported": sum(r.usage_reported for r in ok),
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "distinct_adapters": len({r.adapter for r in ok if r.adapter is not None}),
        "base_requests": sum(r.adapter is None for r in ok),
        "percentiles": list(percentiles),
    }
    for m in METRICS:
        s[m] = stats_ms(metric_values(records, m), percentiles)
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        s["goodput"] = {"slo_ms": dict(slo), "good_requests": good, "request_goodput": good / dur}
    return s


def per_adapter(records: list[RequestRecord], top: int = 10) -> list[dict[str, Any]]:
    """Latency per adapter for the top adapters by request count (the base model is '<base>')."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        if r.status in UNFINISHED:
            continue
        groups.setdefault(r.adapter if r.adapter is not None else "<base>", []).append(r)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
    out = []
    for name, recs in ranked:
        row: dict[str, Any] = {
            "adapter": name,
            "requests": len(recs),
            "completed": sum(r.success for r in recs),
        }
        for m in ("ttft", "tpot", "e2el"):
            row[m] = stats_ms(metric_values(recs, m))
        out.append(row)
    return out
