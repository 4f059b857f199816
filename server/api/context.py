"""Per-request context: the X-Request-Id header (echoed or generated) and the caller's tenant."""
from __future__ import annotations

import re
import uuid

from fastapi import Request

HEADER = "x-request-id"
_SAFE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")  # echo only ids that are safe to put in headers and logs


def tenant_of(request: Request) -> str | None:
    """The tenant an auth layer attached to this request (request.state.tenant), or None (single tenant)."""
    return getattr(request.state, "tenant", None)


def set_request_id(request: Request, generated: str) -> str:
    """Record the id of this response (a cmpl-/chatcmpl- id) unless the client sent its own; returns the header."""
    state = request.scope.setdefault("state", {})
    if not state.get("client_request_id"):
        state["request_id"] = generated
    return state["request_id"]


class RequestIdMiddleware:
    """Pure ASGI middleware (streaming-safe): every HTTP response carries X-Request-Id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        state = scope.setdefault("state", {})
        if _SAFE.fullmatch(incoming):
            state["client_request_id"] = state["request_id"] = incoming
        else:
            state["client_request_id"], state["request_id"] = None, uuid.uuid4().hex

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", str(state["request_id"]).encode("latin-1")))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_id)
