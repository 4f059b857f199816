"""A live loramux server on 127.0.0.1 (uvicorn in a thread, random port) for end-to-end tests."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(cache_dir: Path, **config_overrides):
    """Yields (base_url, runtime) for a server on the embedded demo model (or config_overrides['model'])."""
    import uvicorn

    from loramux.server.api.app import create_app
    from loramux.server.config import ServerConfig
    from loramux.server.runtime import Runtime

    port = free_port()
    cfg = ServerConfig(cache_dir=Path(cache_dir), port=port, **config_overrides)
    runtime = Runtime(cfg)
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise RuntimeError("server did not become ready")
    try:
        yield base, runtime
    finally:
        server.should_exit = True
        thread.join(timeout=15)
