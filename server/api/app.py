"""create_app(runtime): the FastAPI application with its routes, error handlers and engine lifecycle."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from . import completions, models
from .errors import error_response, install_error_handlers


def create_app(runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.async_engine.start(asyncio.get_running_loop())
        runtime.ready = True
        try:
            yield
        finally:
            runtime.ready = False
            runtime.async_engine.shutdown()

    app = FastAPI(title="loramux", version="0.1.0", lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(models.router)

    @app.get("/health")
    async def health():
        if runtime.async_engine.dead is not None:
            return error_response(503, "the engine has stopped")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        if not runtime.ready:
            return error_response(503, "the model is not loaded yet")
        return {"status": "ready", "model": runtime.model_name}

    return app
