"""Adapters over REST: POST /v1/adapters, PUT (new version) / GET / DELETE /v1/adapters/{id}, GET /v1/adapters."""
from __future__ import annotations

import asyncio
import shutil

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .context import tenant_of
from .errors import APIError
from .schemas import AdapterCard, AdapterDeleted, AdapterList
from .uploads import CONFIG, TOKENIZER, WEIGHTS, read_upload

router = APIRouter()

DEFAULT_MAX_ADAPTER_BYTES = 4 << 30  # the registry's own ceiling when --max-adapter-bytes is not set
SIDE_FILES_BYTES = 16 << 20  # room for adapter_config.json, tokenizer_config.json and multipart framing
SIDE_FILE_LIMIT = 1 << 20  # each of adapter_config.json and tokenizer_config.json


def _service(rt):
    service = getattr(rt, "adapters", None)
    if service is None:
        raise APIError(503, "adapter management is not available on this server")
    return service


def _card(rt, summary: dict) -> AdapterCard:
    """The public view of an adapter summary: known fields only (never a server path)."""
    keep = {k: summary[k] for k in AdapterCard.model_fields if k in summary and k not in ("object", "parent")}
    keep["created"] = int(keep.get("created") or 0)
    return AdapterCard(**keep, parent=rt.model_name)


def max_adapter_bytes(rt) -> int:
    return int(getattr(rt.config, "max_adapter_bytes", None) or DEFAULT_MAX_ADAPTER_BYTES)


def _caller(request: Request) -> tuple[str | None, bool]:
    tenant = tenant_of(request)
    return tenant, getattr(request.state, "role", "admin" if tenant is None else "user") == "admin"


async def _upload(request: Request, path_id: str | None, replace: bool) -> JSONResponse:
    rt = request.app.state.runtime
    service = _service(rt)
    tenant, admin = _caller(request)
    if getattr(rt, "draining", False):
        raise APIError(503, "the server is shutting down", None, "server_draining", {"Retry-After": "1"})
    ticket = request.app.state.admission.admit(tenant, 1, 0, kind="upload")  # 503 when too many run at once
    staged = await asyncio.to_thread(service.staging_dir)
    try:
        limit = max_adapter_bytes(rt)
        form_id, files = await read_upload(request, staged, limit, SIDE_FILE_LIMIT, limit + SIDE_FILES_BYTES)
        if path_id is not None and form_id not in (None, path_id):
            raise APIError(400, f"the form field id {form_id[:64]!r} differs from the id in the path", "id")
        adapter_id = path_id if path_id is not None else form_id
        if not adapter_id:
            raise APIError(400, "the form field id (the adapter's name) is required", "id")
        for name in (CONFIG, WEIGHTS):
            if name not in files:
                raise APIError(400, f"the upload has no {name}", "file")
        # Validation reads the files and publishes by rename: keep it off the event loop.
        summary = await asyncio.to_thread(service.upload_staged, adapter_id, staged, tenant, replace, admin)
    finally:
        ticket.release()
        await asyncio.to_thread(shutil.rmtree, staged, True)  # gone already once published
    created = not replace or summary.get("version") == 1  # PUT: 201 for a new id, 200 for a new version
    return JSONResponse(_card(rt, summary).model_dump(), status_code=201 if created else 200)


_BINARY = {"type": "string", "format": "binary"}
_FORM = {"type": "object", "required": [CONFIG, WEIGHTS],
         "properties": {"id": {"type": "string"}, CONFIG: _BINARY, WEIGHTS: _BINARY, TOKENIZER: _BINARY}}
_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": dict(
    _FORM, required=["id", CONFIG, WEIGHTS])}}}}
_PUT_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _FORM}}}}


@router.post("/v1/adapters", status_code=201, openapi_extra=_UPLOAD_DOC)
async def upload_adapter(request: Request):
    """Create an adapter in the caller's namespace (409 if the id exists there or publicly)."""
    return await _upload(request, None, replace=False)


@router.put("/v1/adapters/{adapter_id:path}", openapi_extra=_PUT_DOC)
async def replace_adapter(adapter_id: str, request: Request):
    """Create or replace: a new version; requests already admitted keep the version they started with."""
    return await _upload(request, adapter_id, replace=True)


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> AdapterList:
    rt = request.app.state.runtime
    return AdapterList(data=[_card(rt, a) for a in _service(rt).list(*_caller(request))])


@router.get("/v1/adapters/{adapter_id:path}")
async def get_adapter(adapter_id: str, request: Request) -> AdapterCard:
    rt = request.app.state.runtime
    return _card(rt, _service(rt).get(adapter_id, *_caller(request)))


@router.delete("/v1/adapters/{adapter_id:path}")
async def delete_adapter(adapter_id: str, request: Request) -> AdapterDeleted:
    rt = request.app.state.runtime
    service = _service(rt)
    await asyncio.to_thread(service.delete, adapter_id, *_caller(request))
    return AdapterDeleted(id=adapter_id)
