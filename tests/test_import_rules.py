"""DESIGN.md §3 import rules, checked on the source (AST), so layering cannot erode silently."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    rel_pkg = {"server": "loramux.server", "kernels": "loramux.kernels", "adapters": "loramux.adapters"}
    parts = path.relative_to(ROOT).with_suffix("").parts
    pkg = ".".join([rel_pkg.get(parts[0], parts[0]), *parts[1:-1]])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _files(folder: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in sorted((ROOT / folder).rglob("*.py")) if not any(e in p.parts for e in exclude)]


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", _files("kernels"), ids=str)
def test_kernels_import_only_torch_and_triton(path):
    bad = {m for m in _imports(path) if _top(m) not in STDLIB | {"torch", "triton"}
           and not m.startswith("loramux.kernels")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("adapters"), ids=str)
def test_adapters_never_import_server(path):
    assert not {m for m in _imports(path) if m.startswith("loramux.server")}


@pytest.mark.parametrize("rel", ["server/engine/scheduler.py", "server/engine/block_manager.py",
                                 "server/engine/request.py", "adapters/slots.py"])
def test_bookkeeping_modules_import_no_torch(rel):
    assert not {m for m in _imports(ROOT / rel) if _top(m) in ("torch", "triton", "numpy")}


@pytest.mark.parametrize("path", _files("server/api"), ids=str)
def test_api_never_imports_runner_models_or_kernels(path):
    banned = ("loramux.server.runner", "loramux.server.models", "loramux.kernels")
    assert not {m for m in _imports(path) if m.startswith(banned)}


@pytest.mark.parametrize("path", _files("loadtest", exclude=("bench",)), ids=str)
def test_load_generator_is_black_box(path):
    assert not {m for m in _imports(path) if _top(m) == "loramux"}, "the load generator speaks HTTP only"


def test_rules_see_real_imports():
    """Guard against a checker that finds nothing: known imports must be visible."""
    assert "torch" in _imports(ROOT / "kernels" / "attention.py")
    assert "loramux.server.engine.block_manager" in _imports(ROOT / "server" / "engine" / "scheduler.py")
