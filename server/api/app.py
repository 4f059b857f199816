"""create_app(runtime): the FastAPI app with its routes, guards, error handlers, metrics and engine lifecycle."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import adapters, chat, completions, info, metrics, models
from .admission import Admission
from .auth import KeyStore
from .context import RequestIdMiddleware
from .errors import install_error_handlers
from .guard import GuardMiddleware

log = logging.getLogger("loramux.api")


def _cfg(runtime, name: str, default):
    value = getattr(runtime.config, name, None)
    return default if value is None else value


def build_admission(runtime, keys: KeyStore | None) -> Admission:
    max_seqs = int(_cfg(runtime, "max_num_seqs", 64))
    return Admission(max_in_flight=max_seqs + int(_cfg(runtime, "max_queued_requests", 512)),
                     requests_per_s=float(_cfg(runtime, "rate_limit_requests_per_s", 0.0)),
                     tokens_per_s=float(_cfg(runtime, "rate_limit_tokens_per_s", 0.0)),
                     burst_s=float(_cfg(runtime, "rate_limit_burst_s", 10.0)),
                     tenant_limits=keys.tenant_limits if keys is not None else None,
                     max_uploads=int(_cfg(runtime, "max_concurrent_uploads", 2)))


def create_app(runtime, max_adapter_labels: int = 32, keys: KeyStore | None = None) -> FastAPI:
    """keys: the API keys (default: loaded from runtime.config.api_keys; none there = open single-tenant mode)."""
    if keys is None and _cfg(runtime, "api_keys", None) is not None:
        keys = KeyStore.from_file(runtime.config.api_keys)  # KeyFileError: a clear message, before serving
    public_metrics = bool(_cfg(runtime, "public_metrics", False))
    if keys is None:
        log.warning("no --api-keys: running OPEN in single-tenant mode (no authentication; every caller is the "
                    "admin of one shared namespace)")
    else:
        log.info("API keys: %d keys for tenants %s; /metrics %s", len(keys), ", ".join(keys.tenants()),
                 "is public" if public_metrics else "needs an admin key")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.async_engine.start(asyncio.get_running_loop())
        runtime.ready = True
        try:
            yield
        finally:
            runtime.ready = False
            runtime.async_engine.shutdown()

    app = FastAPI(title="loramux", version=info.version(), lifespan=lifespan)
    app.state.runtime = runtime
    app.state.keys = keys
    app.state.admission = build_admission(runtime, keys)
    app.state.metrics = metrics.Metrics(runtime, max_adapter_labels)
    app.state.metrics.registry.register(metrics.AdmissionCollector(app.state.admission, runtime))
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, runtime=runtime, keys=keys,
                       max_body_bytes=int(_cfg(runtime, "max_body_bytes", 8 << 20)), public_metrics=public_metrics,
                       max_header_bytes=int(_cfg(runtime, "max_header_bytes", 0)))
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: guard errors carry X-Request-Id too
    for module in (completions, chat, models, adapters, info, metrics):
        app.include_router(module.router)
    return app
