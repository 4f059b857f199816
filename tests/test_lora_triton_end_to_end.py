"""Issue 4 end to end on CPU: the PEFT-equivalence test passes with the LoRA path through the Triton kernels
(TRITON_INTERPRET=1, in a subprocess so the interpreter setting does not leak into other tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("extra", [{"LORAMUX_FUSED_LORA_MLP": "0", "LORAMUX_FUSED_LORA_QKV": "0"},
                                   {"LORAMUX_FUSED_LORA_MLP": "1", "LORAMUX_FUSED_LORA_QKV": "1"},
                                   {"LORAMUX_LORA_TILE_TABLE": "0", "LORAMUX_LORA_EXPAND_BM1": "0",
                                    "LORAMUX_LORA_REDUCE_PARTIALS": "0"}],
                         ids=["two-launch", "fused-expands", "segment-walk-tiles"])
def test_peft_equivalence_through_triton_interpreter(extra):
    env = dict(os.environ, TRITON_INTERPRET="1", LORAMUX_KERNEL_BACKEND="triton", **extra)
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests / "test_adapters_vs_peft.py"),
         "-k", "each_adapter_matches and llama"], env=env, cwd=tests.parent, capture_output=True, text=True,
        timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
