"""Adapters over REST: POST /v1/adapters (multipart upload), GET /v1/adapters, GET/DELETE /v1/adapters/{id}."""
from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.requests import Request as RawRequest

from .context import tenant_of
from .errors import APIError
from .schemas import AdapterCard, AdapterDeleted, AdapterList

router = APIRouter()

CONFIG, WEIGHTS, TOKENIZER = "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"
DEFAULT_MAX_ADAPTER_BYTES = 4 << 30  # the registry's own ceiling when --max-adapter-bytes is not set
SIDE_FILES_BYTES = 16 << 20  # room for adapter_config.json, tokenizer_config.json and multipart framing


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


def _limited(receive, limit: int):
    """An ASGI receive that refuses a body longer than `limit` bytes as it streams in (no Content-Length trust)."""
    seen = 0

    async def limited_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise APIError(413, f"the upload is larger than the limit of {limit} bytes", "file",
                               "adapter_too_large")
        return message

    return limited_receive


async def _read_upload(request: Request, limit: int) -> tuple[str, dict[str, bytes]]:
    """(id, {file name: bytes}) from a multipart body; each file is named by its field name or its filename."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise APIError(400, f"upload an adapter as multipart/form-data with files {CONFIG} and {WEIGHTS} "
                            f"(optionally {TOKENIZER}) and a form field id", "file")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the upload has {length} bytes, more than the limit of {limit} bytes", "file",
                       "adapter_too_large")
    form = await RawRequest(request.scope, _limited(request.receive, limit)).form(max_files=8, max_fields=8)
    try:
        adapter_id, files = None, {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = key if key in (CONFIG, WEIGHTS, TOKENIZER) else os.path.basename(value.filename or "")
                if name not in (CONFIG, WEIGHTS, TOKENIZER):
                    raise APIError(400, f"unexpected file {name or key!r}; send {CONFIG}, {WEIGHTS} and "
                                        f"optionally {TOKENIZER}", "file")
                if name in files:
                    raise APIError(400, f"{name} was sent twice", "file")
                files[name] = await value.read()
            elif key == "id":
                adapter_id = value
            else:
                raise APIError(400, f"unexpected form field {key!r}; the only field is id", key)
    finally:
        await form.close()
    if not adapter_id:
        raise APIError(400, "the form field id (the adapter's name) is required", "id")
    for name in (CONFIG, WEIGHTS):
        if name not in files:
            raise APIError(400, f"the upload has no {name}", "file")
    return adapter_id, files


_BINARY = {"type": "string", "format": "binary"}
_UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["id", CONFIG, WEIGHTS],
    "properties": {"id": {"type": "string"}, CONFIG: _BINARY, WEIGHTS: _BINARY, TOKENIZER: _BINARY}}}}}}


@router.post("/v1/adapters", status_code=201, openapi_extra=_UPLOAD_DOC)
async def upload_adapter(request: Request):
    rt = request.app.state.runtime
    service = _service(rt)
    limit = max_adapter_bytes(rt)
    adapter_id, files = await _read_upload(request, limit + SIDE_FILES_BYTES)
    if len(files[WEIGHTS]) > limit:
        raise APIError(413, f"{WEIGHTS} has {len(files[WEIGHTS])} bytes, more than the limit of {limit} bytes",
                       "file", "adapter_too_large")
    # Validation reads safetensors headers and writes to disk: keep it off the event loop.
    summary = await asyncio.to_thread(service.upload, adapter_id, files[CONFIG], files[WEIGHTS],
                                      files.get(TOKENIZER), tenant_of(request))
    return JSONResponse(_card(rt, summary).model_dump(), status_code=201)


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> AdapterList:
    rt = request.app.state.runtime
    return AdapterList(data=[_card(rt, a) for a in _service(rt).list(tenant_of(request))])


@router.get("/v1/adapters/{adapter_id}")
async def get_adapter(adapter_id: str, request: Request) -> AdapterCard:
    rt = request.app.state.runtime
    return _card(rt, _service(rt).get(adapter_id, tenant_of(request)))


@router.delete("/v1/adapters/{adapter_id}")
async def delete_adapter(adapter_id: str, request: Request) -> AdapterDeleted:
    rt = request.app.state.runtime
    service = _service(rt)
    await asyncio.to_thread(service.delete, adapter_id, tenant_of(request))
    return AdapterDeleted(id=adapter_id)
