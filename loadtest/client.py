"""One request over HTTP: OpenAI completions/chat body, SSE parsing and the per-request timing record."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from .workload import RequestSpec

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestOptions:
    """Settings shared by every request of a run."""

    base_url: str
    endpoint: str = "completions"
    api_key: str | None = None
    stream: bool = True
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    """What was measured for one request; times in seconds."""

    index: int
    model: str
    adapter: str | None
    input_len: int  # planned prompt words
    output_len: int  # planned max_tokens
    start: float | None = None  # when it was sent, relative to the run start
    status: int | str = "not_sent"  # HTTP status, or an error name (ReadTimeout, stream_error, cancelled)
    success: bool = False
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)  # gaps between chunks that carried text
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False  # token counts came from `usage` (else: counted chunks / planned prompt)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as vllm bench defines it."""
        if self.ttft is None or self.e2el is None or self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


def build_body(spec: RequestSpec, opts: RequestOptions) -> dict[str, Any]:
    """The JSON body for spec; extension fields go in as top-level keys, like the openai client's extra_body."""
    body: dict[str, Any] = {"model": spec.model, "max_tokens": spec.output_len, "temperature": opts.temperature}
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if opts.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    body.update(opts.extra_body)
    return body


def _chunk_text(obj: dict[str, Any]) -> str:
    """Text carried by a completion or chat chunk (first choice), '' if none."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:
        return (c.get("delta") or {}).get("content") or ""
    if "message" in c:
        return (c.get("message") or {}).get("content") or ""
    return c.get("text") or ""


def _error_text(obj: Any) -> str:
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or obj)[:500]


def _take_usage(rec: RequestRecord, obj: dict[str, Any]) -> None:
    usage = obj.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
        rec.usage_reported = True


async def send_request(
    client: httpx.AsyncClient, spec: RequestSpec, opts: RequestOptions, rec: RequestRecord, t0: float
) -> RequestRecord:
    """Send spec, filling rec in place (so a cancelled request keeps what was measured). Never raises
    for HTTP or protocol errors: they end up in rec.status and rec.error."""
    body = build_body(spec, opts)
    sent = time.perf_counter()
    rec.start = sent - t0
    try:
        if opts.stream:
            await _stream(client, body, opts, rec, sent)
        else:
            resp = await client.post(opts.url, json=body, headers=opts.headers)
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = resp.text[:500]
                return rec
            obj = resp.json()
            rec.ttft = rec.e2el = time.perf_counter() - sent
            _take_usage(rec, obj)
            if not rec.usage_reported:
                rec.output_tokens = len(_chunk_text(obj).split())
            rec.success = True
    except httpx.HTTPError as e:
        rec.status, rec.error = type(e).__name__, str(e)[:500]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # malformed JSON or chunk shape
        rec.status, rec.error = "bad_response", f"{type(e).__name__}: {e}"[:500]
    if not rec.usage_reported:
        rec.prompt_tokens = spec.input_len
    return rec


async def _stream(
    client: httpx.AsyncClient, body: dict[str, Any], opts: RequestOptions, rec: RequestRecord, sent: float
) -> None:
    chunks, done = 0, False
    last = sent
    async with client.stream("POST", opts.url, json=body, headers=opts.headers) as resp:
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.error = (await resp.aread()).decode("utf-8", "replace")[:500]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ': keep-alive' comments, event: lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise ValueError(f"chunk is not an object: {data[:100]}")
            if obj.get("error"):  # an error after the 200 status line (server conventions §1.4)
                rec.status, rec.error = "stream_error", _error_text(obj)
                return
            now = time.perf_counter()
            if _chunk_text(obj):
                if rec.ttft is None:
                    rec.ttft = now - sent
                else:
                    rec.itl.append(now - last)
                last = now
                chunks += 1
            _take_usage(rec, obj)
    rec.e2el = time.perf_counter() - sent
    if not rec.usage_reported:
        rec.output_tokens = chunks
    if not done:  # the connection closed before `data: [DONE]`
        rec.status, rec.error = "incomplete_stream", f"stream ended without [DONE] after {chunks} text chunks"
        return
    rec.success = True
