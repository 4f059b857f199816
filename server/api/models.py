"""GET /v1/models and /v1/models/{id}: the base model and the adapters the caller can use."""
from __future__ import annotations

from fastapi import APIRouter, Request

from .context import tenant_of
from .errors import APIError
from .schemas import ModelCard, ModelList

router = APIRouter()


def _cards(request: Request) -> list[ModelCard]:
    rt = request.app.state.runtime
    base = rt.model_name
    cards = [ModelCard(id=base, created=rt.created, root=base, max_model_len=rt.max_model_len)]
    service = getattr(rt, "adapters", None)
    if service is not None:
        tenant = tenant_of(request)
        admin = getattr(request.state, "role", "admin" if tenant is None else "user") == "admin"
        for a in service.list(tenant, admin):  # each adapter is its own model; root is its id, never a path
            cards.append(ModelCard(id=a["id"], created=int(a.get("created") or rt.created), root=a["id"],
                                   parent=base, max_model_len=rt.max_model_len))
    return cards


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model `{model_id}` does not exist.", "model", "model_not_found")
