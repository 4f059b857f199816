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


def wait_ready(base: str, timeout: float = 60.0, proc=None) -> None:
    """Poll /ready until 200; fail early if the server process (when given) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not become ready")


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
    wait_ready(base, 30)
    try:
        yield base, runtime
    finally:
        server.should_exit = True
        thread.join(timeout=3)
        if thread.is_alive():  # idle keep-alive connections hold a graceful shutdown open; don't wait them out
            server.force_exit = True
            thread.join(timeout=15)
