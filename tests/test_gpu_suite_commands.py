"""Every benchmark command of loadtest/bench/gpu_suite.sh parses its flags, and every GPU pytest selection in it
collects tests: a typo there would cost a scarce device call (checked on CPU: flags are parsed, nothing is run)."""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "loadtest" / "bench" / "gpu_suite.sh"


def _commands() -> list[tuple[str, list[str]]]:
    """(part, argv after `step N` and env assignments) of every step line, continuations joined and the suite's
    own string variables (MANY="...", T1="...") expanded."""
    text = SUITE.read_text().replace("\\\n", " ")
    variables = {f"${k}": shlex.split(v) for k, v in re.findall(r'^\s*(\w+)="([^"]*)"', text, re.M | re.S)}
    out, part = [], None
    for line in text.splitlines():
        m = re.match(r'\s*if \[ "\$PART" = (\w+) \]', line)
        if m:
            part = m.group(1)
        line = line.split("  #")[0].strip()
        if not line.startswith("step "):
            continue
        argv = [w for a in shlex.split(line)[2:] for w in variables.get(a, [a])]
        if argv and argv[0] == "env":
            argv = argv[1:]
        while argv and (re.match(r"^[A-Z_0-9]+=", argv[0]) or argv[0].startswith("$v=") or argv[0] == "$f"):
            argv = argv[1:]  # environment assignments, literal or from a for-loop variable
        out.append((part, argv))
    return out


class _Parsed(Exception):
    pass


def _bench_cases():
    return [(p, a) for p, a in _commands() if a[:2] == ["python", "-m"] and a[2].startswith("$B.")]


def _pytest_cases():
    return [(p, a) for p, a in _commands() if a[:3] == ["python", "-m", "pytest"]]


def test_the_suite_has_steps_of_both_kinds():
    assert len(_bench_cases()) > 20 and len(_pytest_cases()) > 5
    assert {"one", "s9", "s10"} <= {p for p, _ in _bench_cases()}


@pytest.mark.parametrize("part,argv", _bench_cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_bench_flags_parse(part, argv, monkeypatch, tmp_path):
    module = importlib.import_module("loramux.loadtest.bench." + argv[2][len("$B."):])
    args = [a.replace("$OUT", str(tmp_path)).replace("$v", "x").replace("$f", "x").replace("$a", "0")
            for a in argv[3:]]
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)  # exits with status 2 on an unknown flag or a bad value
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [argv[2], *args])  # some mains take no argv
    with pytest.raises(_Parsed):
        module.main()


@pytest.mark.parametrize("part,argv", _pytest_cases(), ids=lambda x: x if isinstance(x, str) else None)
def test_gpu_pytest_selection_collects_tests(part, argv):
    args = [a for a in argv[3:] if a != "-q"]
    for a in args:
        if a.startswith("tests/"):
            assert (ROOT / a).is_file(), a
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    collected = [ln for ln in run.stdout.splitlines() if "::" in ln]
    assert run.returncode == 0 and collected, run.stdout[-2000:] + run.stderr[-2000:]
