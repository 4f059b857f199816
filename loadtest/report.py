"""Human and file output: the vllm-bench-style table, results.json, and the `compare` table."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .client import RequestRecord

WIDTH = 50
METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{label:<40}{value:<10}"


def _stat_label(key: str) -> str:
    return {"mean": "Mean", "median": "Median"}.get(key, key.upper())


def format_table(s: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """The summary dict from metrics.summarize as a fixed-width table."""
    lines = [f" {title} ".center(WIDTH, "=")]
    lines.append(_row("Successful requests:", s["completed"]))
    lines.append(_row("Failed requests:", s["failed"]))
    for status, n in s["failed_by_status"].items():
        lines.append(_row(f"  status {status}:", n))
    if s["cancelled"] or s["not_sent"]:
        lines.append(_row("Cancelled / not sent (interrupted):", f"{s['cancelled']} / {s['not_sent']}"))
    lines.append(_row("Benchmark duration (s):", s["duration_s"]))
    lines.append(_row("Total input tokens:", s["total_input_tokens"]))
    lines.append(_row("Total generated tokens:", s["total_output_tokens"]))
    lines.append(_row("Request throughput (req/s):", s["request_throughput"]))
    if "goodput" in s:
        lines.append(_row("Request goodput (req/s):", s["goodput"]["request_goodput"]))
    lines.append(_row("Output token throughput (tok/s):", s["output_throughput"]))
    lines.append(_row("Total token throughput (tok/s):", s["total_token_throughput"]))
    if s["distinct_adapters"] or s["base_requests"]:
        both = f"{s['distinct_adapters']} / {s['base_requests']}"
        lines.append(_row("Distinct adapters / base requests:", both))
    if s["completed"] and s["usage_reported"] < s["completed"]:
        lines.append(_row("Requests without usage (chunks counted):", s["completed"] - s["usage_reported"]))
    for m, (short, long) in METRIC_TITLES.items():
        lines.append(f"{long}".center(WIDTH, "-"))
        st = s[m]
        keys = ["mean", "median"] + [f"p{p if not float(p).is_integer() else int(p)}" for p in s["percentiles"]]
        for key in dict.fromkeys(keys):
            if key == "p50":
                continue  # the median row already shows it
            lines.append(_row(f"{_stat_label(key)} {short} (ms):", st[key]))
    if "goodput" in s:
        slo = ", ".join(f"{k}<={v:g}ms" for k, v in s["goodput"]["slo_ms"].items())
        lines.append(_row(f"Good requests ({slo}):", s["goodput"]["good_requests"]))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def git_revision(path: Path | None = None) -> dict[str, Any]:
    """The tool's git revision and whether its tree has changes; None values when git is unavailable."""
    cwd = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if rev else None
    return {"revision": rev, "dirty": bool(status) if status is not None else None}


def write_results(
    out_dir: Path,
    config: dict[str, Any],
    summary: dict[str, Any],
    adapters: list[dict[str, Any]],
    records: list[RequestRecord],
) -> Path:
    """results.json: tool and environment, config, summary, per-adapter stats, every request."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "tool": "loramux-loadtest",
        "tool_version": __version__,
        "git": git_revision(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": sys.version.split()[0], "platform": platform.platform()},
        "config": config,
        "summary": summary,
        "per_adapter": adapters,
        "requests": [r.to_json() for r in records],
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    doc = json.loads(p.read_text())
    if "summary" not in doc:
        raise ValueError(f"{p} is not a loadtest results.json (no 'summary')")
    return doc


COMPARE_ROWS = [
    ("Successful requests", ("completed",)),
    ("Failed requests", ("failed",)),
    ("Duration (s)", ("duration_s",)),
    ("Request throughput (req/s)", ("request_throughput",)),
    ("Request goodput (req/s)", ("goodput", "request_goodput")),
    ("Output tok/s", ("output_throughput",)),
    ("Total tok/s", ("total_token_throughput",)),
] + [
    (f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms)", (m, stat))
    for m, (short, _) in METRIC_TITLES.items()
    for stat in ("mean", "median", "p90", "p99")
]


def _get(d: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) else None


def compare(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str] = ("A", "B")) -> str:
    """Side-by-side table of two results.json documents with the ratio B/A."""
    name_w = max(len(n) for n, _ in COMPARE_ROWS) + 2
    head = f"{'':<{name_w}}{labels[0][:14]:>15}{labels[1][:14]:>15}{'B/A':>9}"
    lines = [head, "-" * len(head)]
    for name, keys in COMPARE_ROWS:
        va, vb = _get(a["summary"], keys), _get(b["summary"], keys)
        if va is None and vb is None:
            continue
        ratio = f"{vb / va:.2f}x" if va and vb is not None else "-"
        fa, fb = (("-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)) for v in (va, vb))
        lines.append(f"{name:<{name_w}}{fa:>15}{fb:>15}{ratio:>9}")
    for label, doc in zip(labels, (a, b)):
        cfg = doc.get("config", {})
        desc = ", ".join(
            f"{k}={cfg[k]}" for k in ("base_url", "endpoint", "num_requests", "request_rate", "max_concurrency",
                                      "adapter_dist", "seed") if k in cfg
        )
        lines.append(f"{label}: {desc}")
    return "\n".join(lines)
