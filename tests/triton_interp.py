"""Runs a test file's Triton cases under TRITON_INTERPRET=1 in a fresh interpreter: the variable is read when
kernels are decorated, so setting it in-process would leak into every later test of the session."""
from __future__ import annotations

import os
import subprocess
import sys


def run_triton_cases(test_file: str, k: str, env: dict[str, str], timeout: int = 300,
                     allow_skips: bool = True) -> str:
    """pytest -k k on test_file with TRITON_INTERPRET=1 and `env` on top (e.g. a backend override cleared so
    "auto" picks Triton); asserts that cases ran and all passed -> pytest's stdout."""
    full = dict(os.environ, TRITON_INTERPRET="1", **env)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", k]
    p = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert " passed" in p.stdout and " failed" not in p.stdout, p.stdout[-2000:]
    assert allow_skips or "skipped" not in p.stdout, p.stdout[-2000:]
    return p.stdout
