"""PNG plots of a run: latency CDFs, tokens/s over time, per-adapter latency (needs matplotlib)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .client import RequestRecord
from .metrics import metric_values

CDF_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(out_dir: Path, records: list[RequestRecord], duration: float, top: int = 10) -> list[Path]:
    """Write the PNGs into out_dir; returns their paths ([] with a warning when matplotlib is missing)."""
    plt = _pyplot()
    if plt is None:
        warnings.warn("matplotlib is not installed: skipping plots (pip install matplotlib)", stacklevel=2)
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _latency_cdfs(plt, out_dir / "latency_cdf.png", records),
        _over_time(plt, out_dir / "throughput_over_time.png", records, duration),
        _per_adapter(plt, out_dir / "per_adapter_latency.png", records, top),
    ]
    return paths


def _latency_cdfs(plt, path: Path, records: list[RequestRecord]) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (m, title) in zip(axes.flat, CDF_TITLES.items()):
        vals = np.sort(np.asarray(metric_values(records, m)) * 1000.0)
        if vals.size:
            ax.step(vals, np.arange(1, vals.size + 1) / vals.size, where="post")
            for p in (50, 90, 99):
                ax.axvline(np.percentile(vals, p), ls=":", lw=0.8, color="gray")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title} CDF (dotted: p50, p90, p99)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if m != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _over_time(plt, path: Path, records: list[RequestRecord], duration: float) -> Path:
    """Output tokens/s and requests in flight, in time bins over the run."""
    span = max(duration, 1e-3)
    width = 1.0 if span >= 30 else span / 30
    edges = np.arange(0.0, span + width, width)
    times, weights = [], []
    for r in records:
        if not r.success or r.ttft is None or r.start is None:
            continue
        chunk_t = r.start + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        times.append(chunk_t)
        weights.append(np.full(chunk_t.size, r.output_tokens / chunk_t.size))
    tok = np.zeros(len(edges) - 1)
    if times:
        tok, _ = np.histogram(np.concatenate(times), bins=edges, weights=np.concatenate(weights))
    mids = (edges[:-1] + edges[1:]) / 2
    inflight = [
        sum(1 for r in records if r.start is not None and r.e2el is not None and r.start <= t < r.start + r.e2el)
        for t in mids
    ]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(mids, tok / width)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(f"Throughput over time ({width:.2g} s bins)")
    ax1.grid(alpha=0.3)
    ax2.plot(mids, inflight, color="tab:orange")
    ax2.set_ylabel("requests in flight")
    ax2.set_xlabel("seconds since start")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_adapter(plt, path: Path, records: list[RequestRecord], top: int) -> Path:
    """Box plots of TTFT and E2E latency for the adapters with the most requests."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        if r.success:
            groups.setdefault(r.adapter if r.adapter is not None else "<base>", []).append(r)
    names = sorted(groups, key=lambda k: (-len(groups[k]), k))[:top]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, m in zip(axes, ("ttft", "e2el")):
        data = [np.asarray(metric_values(groups[n], m)) * 1000.0 for n in names]
        if names:
            ax.boxplot(data, showfliers=True)
            ax.set_xticks(range(1, len(names) + 1))
            ax.set_xticklabels([f"{n}\n(n={len(groups[n])})" for n in names], rotation=45, ha="right", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{CDF_TITLES[m]} by adapter (top {len(names)} by requests)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
