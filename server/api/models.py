"""GET /v1/models: the base model (and, with adapters, the caller's adapters)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .schemas import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    rt = request.app.state.runtime
    return ModelList(data=[ModelCard(id=rt.model_name, created=rt.created, root=rt.model_name)])
