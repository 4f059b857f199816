"""GuardMiddleware (pure ASGI, runs before routing): drain 503, API-key auth 401/403, request-body size 413."""
from __future__ import annotations

from starlette.exceptions import HTTPException

from .auth import OPEN, KeyStore, bearer_token
from .errors import error_response

PROBES = ("/health", "/ready")  # never need a key: liveness and readiness probes carry none
UPLOAD_PREFIX = "/v1/adapters"  # POST/PUT bodies there are adapter uploads, bounded by --max-adapter-bytes


def is_upload(scope) -> bool:
    return scope["method"] in ("POST", "PUT") and scope["path"].rstrip("/").startswith(UPLOAD_PREFIX)


class GuardMiddleware:
    def __init__(self, app, runtime, keys: KeyStore | None, max_body_bytes: int, public_metrics: bool = False,
                 max_header_bytes: int = 0):
        self.app, self.runtime, self.keys = app, runtime, keys
        self.max_body_bytes, self.public_metrics, self.max_header_bytes = max_body_bytes, public_metrics, \
            max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.max_header_bytes:  # h11 bounds what it buffers; this is the exact limit on what arrived whole
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
                len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
            if size > self.max_header_bytes:
                return await error_response(431, f"the request headers are larger than the limit of "
                                                 f"{self.max_header_bytes} bytes", None, "headers_too_large",
                                            {"Connection": "close"})(scope, receive, send)
        metrics = path == "/metrics"
        if getattr(self.runtime, "draining", False) and not metrics:  # a drain stays observable
            return await error_response(503, "the server is shutting down; retry on another replica", None,
                                        "server_draining", {"Retry-After": "1", "Connection": "close"}
                                        )(scope, receive, send)
        principal = OPEN
        if self.keys is not None and not (metrics and self.public_metrics):
            principal = self.keys.authenticate(bearer_token(scope.get("headers", ())))
            if principal is None:
                present = bearer_token(scope.get("headers", ())) is not None
                msg = "invalid API key" if present else "missing API key: send the header 'Authorization: Bearer <key>'"
                return await error_response(401, msg, None, "invalid_api_key",
                                            {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            if metrics and not principal.admin:
                return await error_response(403, "/metrics needs an admin key (or --public-metrics)", None,
                                            "admin_required")(scope, receive, send)
        state = scope.setdefault("state", {})
        state["tenant"], state["role"] = principal.tenant, principal.role
        if is_upload(scope):
            return await self.app(scope, receive, send)  # the upload route streams and bounds its own body
        limit = self.max_body_bytes
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"")
        if length.isdigit() and int(length) > limit:
            return await error_response(413, f"the request body has {int(length)} bytes; the limit is {limit}",
                                        None, "request_too_large", {"Connection": "close"})(scope, receive, send)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # a body without (or lying about) Content-Length
                    raise HTTPException(413, f"the request body is larger than the limit of {limit} bytes")
            return message

        await self.app(scope, bounded_receive, send)
