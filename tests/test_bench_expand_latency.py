"""The expand-latency GPU microbenchmark's CPU dry run (each op once under TRITON_INTERPRET=1, in a subprocess so
the variable does not leak): keeps its calls in step with the kernels' signatures between GPU sessions."""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_dry_run_calls_every_op():
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "loramux.loadtest.bench.bench_expand_latency", "--dry", "--tokens",
                        "4"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ops = [line for line in p.stdout.splitlines() if line.startswith(("expand", "shrink", "silu", "add", "noop"))]
    assert len(ops) == 22, p.stdout
