"""Shared fixtures: one live server on the embedded demo model per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
