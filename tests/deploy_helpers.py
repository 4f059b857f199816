"""Shared by the deployment tests (tests/test_deploy.py, tests/test_deploy_k8s.py): paths and small parsers."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "loramux.json"
UID = 10001
# LORAMUX_* settings the manifests may set before `loramux serve` has the flag (none at the moment).
PENDING_FLAGS: set[str] = set()

def serve_env_names() -> set[str]:
    """LORAMUX_* names of every `loramux serve` option (the CLI derives each default from one)."""
    import argparse

    from loramux.server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    names = set()
    for action in serve._actions:
        # the first long name only: a --x / --no-x pair reads one variable, LORAMUX_X
        opt = next((o for o in action.option_strings if o.startswith("--")), None)
        if opt is not None and opt != "--help":
            names.add("LORAMUX_" + opt[2:].upper().replace("-", "_"))
    return names


def env_pairs(args: str) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in args.split() if "=" in tok)


def load_yaml_docs(text: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(text) if d]


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered here (raw YAML is checked by "
                    "test_k8s_raw_yaml)")
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return load_yaml_docs(r.stdout)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]
