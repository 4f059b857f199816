"""create_app(runtime): the FastAPI application with its routes, error handlers, metrics and engine lifecycle."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import adapters, chat, completions, info, metrics, models
from .context import RequestIdMiddleware
from .errors import install_error_handlers


def create_app(runtime, max_adapter_labels: int = 32) -> FastAPI:
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
    app.state.metrics = metrics.Metrics(runtime, max_adapter_labels)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    for module in (completions, chat, models, adapters, info, metrics):
        app.include_router(module.router)
    return app
