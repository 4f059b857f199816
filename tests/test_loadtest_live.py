"""Issue 8 end to end: make-adapters uploads 4 adapters to a live loramux, then a 20-request Zipf run uses them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_make_adapters_then_zipf_run(demo_server, tmp_path):
    base, runtime = demo_server
    made = _loadtest("make-adapters", "--base-url", base, "--count", "4", "--ranks", "4,8",
                     "--targets", "q_proj,v_proj", "--prefix", "lt-live-", "--out-dir", str(tmp_path / "ad"))
    assert made.returncode == 0, made.stdout + made.stderr
    listed = {a["id"] for a in runtime.adapters.list()}
    assert {f"lt-live-{i}" for i in range(4)} <= listed, listed
    run = _loadtest("run", "--base-url", base, "--num-requests", "20", "--request-rate", "inf",
                    "--adapter-count", "4", "--adapter-prefix", "lt-live-", "--adapter-dist", "zipf:1.0",
                    "--input-len", "16", "--output-len", "6", "--ignore-eos", "--seed", "1", "--no-progress",
                    "--out", str(tmp_path / "run"))
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    records = results["requests"]
    assert len(records) == 20 and all(r["success"] and r["status"] == 200 for r in records), records[:2]
    assert all(r["output_tokens"] == 6 for r in records)  # --ignore-eos makes lengths exact
    assert results["summary"]["completed"] == 20 and results["summary"]["failed"] == 0
    used = [r["adapter"] for r in records]
    assert set(used) <= {f"lt-live-{i}" for i in range(4)}
    assert used.count("lt-live-0") > 20 / 4, "zipf:1.0 should favour the first adapter"
    for metric in ("ttft", "tpot", "itl", "e2el"):
        stats = results["summary"][metric]
        assert stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)
    pngs = sorted((tmp_path / "run").glob("*.png"))
    assert pngs, "the run should write its plots"
    import matplotlib.image

    for png in pngs:
        assert matplotlib.image.imread(png).ndim == 3  # a real, loadable image
