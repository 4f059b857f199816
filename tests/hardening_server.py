"""Helpers for the hardening tests: a live server built like `loramux serve` (keys, limits, drain) in a thread."""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from live_server import free_port, wait_ready  # noqa: F401 (wait_ready re-exported)

KEY_A, KEY_B, KEY_ADMIN = "sk-acme-0123456789abcdef", "sk-beta-0123456789abcdef", "sk-ops-admin-0123456789abc"
KEYS = {"keys": {KEY_A: {"tenant": "acme", "role": "user"},
                 KEY_B: {"tenant": "beta"},
                 "sha256:" + hashlib.sha256(KEY_ADMIN.encode()).hexdigest(): {"tenant": "ops", "role": "admin"}}}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache folder for the demo model (built once per session); each server gets its own adapter folder."""
    return tmp_path_factory.mktemp("hardening-cache")


@contextmanager
def secure_server(cache_dir: Path, adapter_dir: Path, keys: dict | None = KEYS, **overrides):
    """Yields SimpleNamespace(base, runtime, app, server) for a threaded server made by serving.build_server."""
    from loramux.server.api.app import create_app
    from loramux.server.api.serving import build_server
    from loramux.server.config import ServerConfig
    from loramux.server.runtime import Runtime

    key_file = None
    if keys is not None:
        key_file = Path(adapter_dir).parent / f"keys-{free_port()}.json"
        key_file.write_text(json.dumps(keys))
    cfg = ServerConfig(cache_dir=Path(cache_dir), adapter_dir=Path(adapter_dir), port=free_port(), api_keys=key_file,
                       log_level="warning", **overrides)
    runtime = Runtime(cfg)
    app = create_app(runtime)
    server = build_server(app, cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{cfg.port}"
    try:
        wait_ready(base, 30)
        yield SimpleNamespace(base=base, runtime=runtime, app=app, server=server, config=cfg)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        runtime.adapters.close()


def adapter_files(runtime, seed: int = 1, r: int = 4) -> dict[str, bytes]:
    """A valid random PEFT adapter for the demo model, as upload files."""
    import tempfile

    from loramux.adapters.demo import write_random_adapter

    cfg = json.loads((runtime.model_dir / "config.json").read_text())
    folder = write_random_adapter(Path(tempfile.mkdtemp()), cfg, r=r, alpha=2.0 * r, targets=["q_proj", "v_proj"],
                                  seed=seed)
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def upload(base: str, key: str | None, adapter_id: str, files: dict, method: str = "POST") -> httpx.Response:
    url = base + "/v1/adapters" + ("" if method == "POST" else f"/{adapter_id}")
    data = {"id": adapter_id} if method == "POST" else {}
    return httpx.request(method, url, data=data, files=files, headers=auth(key) if key else {}, timeout=60)


def assert_error_shape(r: httpx.Response, status: int | None = None) -> dict:
    assert status is None or r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err
