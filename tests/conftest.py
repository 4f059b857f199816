"""Shared fixtures: one live server on the embedded demo model per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
# `python -m pytest` puts the checkout root on sys.path, where the folders kernels/ and adapters/ (installed as
# loramux.kernels / loramux.adapters) would shadow PyPI packages of those names: transformers >= 5 imports the
# `kernels` package from the Hub when it is installed. The tests import loramux.* only, so the root goes.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
for _name in ("kernels", "adapters"):
    _mod = sys.modules.get(_name)
    if _mod is not None and str(getattr(_mod, "__file__", "") or "").startswith(str(_ROOT)):
        del sys.modules[_name]
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """(base_url, runtime) of a server on the embedded demo model, with its demo adapters."""
    from live_server import live_server

    with live_server(tmp_path_factory.mktemp("demo-cache")) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(demo_server):
    """The official openai client pointed at the demo server (no retries, so errors surface as they are)."""
    import openai

    return openai.OpenAI(base_url=demo_server[0] + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model(demo_server):
    """The demo server's base-model name."""
    return demo_server[1].model_name
