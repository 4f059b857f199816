"""Shared plumbing for completion routes: SamplingParams from a request, fan-out of n x prompts, SSE framing."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Awaitable, TypeVar

from loramux.server.engine.async_engine import StreamDelta
from loramux.server.engine.request import SamplingParams

from .admission import Ticket
from .context import tenant_of
from .errors import APIError, error_body

log = logging.getLogger("loramux.api")
T = TypeVar("T")
MAX_SEQUENCES = 128  # prompts x n of one request (bounds the work one call can queue)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def check_request(rt, body, route: str) -> None:
    """Checks shared by completions and chat, done before any tokenizing; logs ignored unknown fields."""
    extra = sorted((body.model_extra or {}).keys())
    if extra:  # at most a few names, each cut short: a body full of junk keys must not flood the log
        log.warning("%s: ignoring %d unknown field(s): %s", route, len(extra),
                    ", ".join(repr(k[:40]) for k in extra[:8]))
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if rt.async_engine.dead is not None:
        raise APIError(503, "the engine has stopped; the server must be restarted")
    if getattr(rt, "draining", False):
        raise APIError(503, "the server is shutting down; retry on another replica", None, "server_draining",
                       {"Retry-After": "1"})


def admit(request, seqs: int, tokens: int) -> Ticket:
    """Admission (429/503) before tokenizing or rendering; the ticket rides on request.state until released."""
    if seqs > MAX_SEQUENCES:
        raise APIError(400, f"this request asks for {seqs} sequences (prompts x n); at most {MAX_SEQUENCES} are "
                            "allowed in one request", "n")
    ticket = request.app.state.admission.admit(tenant_of(request), seqs, tokens)
    request.state.ticket = ticket
    return ticket


def open_stream(request, engine_request_id: str, prompt_ids: list[int], params: SamplingParams,
                adapter_id: str | None) -> AsyncIterator[StreamDelta]:
    """Start one engine sequence; its deltas pass through the app's metrics."""
    rt = request.app.state.runtime
    stream = rt.async_engine.generate(engine_request_id, prompt_ids, params, adapter_id, tenant=tenant_of(request))
    ticket = getattr(request.state, "ticket", None)
    if ticket is not None:
        stream = _counted(stream, ticket)
    metrics = getattr(request.app.state, "metrics", None)
    label = adapter_id.partition("@")[0] if adapter_id is not None else None  # the key without its version
    return metrics.track(stream, label) if metrics is not None else stream


async def _counted(stream: AsyncIterator[StreamDelta], ticket: Ticket) -> AsyncIterator[StreamDelta]:
    """Report a sequence's real token count to its ticket (settles the admission estimate)."""
    try:
        async for d in stream:
            if d.finish_reason is not None:
                ticket.add_tokens(d.prompt_tokens + d.completion_tokens)
            yield d
    finally:
        await stream.aclose()


async def unless_disconnected(request, work: Awaitable[T]) -> T:
    """Await a non-streaming generation; if the client hangs up first, cancel it (aborting its engine requests)."""
    task = asyncio.ensure_future(work)

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.info("client disconnected; request aborted")
        raise APIError(499, "the client closed the connection")
    return task.result()


async def guard_sse(events: AsyncIterator[str], ticket: Ticket | None = None) -> AsyncIterator[str]:
    """After the 200 is sent, an unexpected failure becomes an SSE error event followed by [DONE]. The request's
    admission ticket is released when the stream ends, however it ends."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 (the status line is gone; this is the only way to tell the client)
        log.exception("stream failed")
        yield sse(error_body(500, f"generation failed: {exc}"))
        yield sse("[DONE]")
    finally:
        if ticket is not None:
            ticket.release()


async def collect_streams(streams: list) -> tuple[list[str], list[list], dict[int, "StreamDelta"]]:
    """Run every sequence to its end: (text per choice, deltas per choice, final delta by choice index).
    An error closes (aborts) every sequence at once and becomes an APIError."""
    texts, deltas, done = [""] * len(streams), [[] for _ in streams], {}
    async with aclosing(merge_streams(streams)) as merged:
        async for i, d in merged:
            if d.error:
                raise APIError(503 if "engine" in d.error else 400, d.error)
            texts[i] += d.text
            deltas[i].append(d)
            if d.finish_reason is not None:
                done[i] = d
    return texts, deltas, done


def usage_of(done: dict[int, "StreamDelta"], n: int) -> dict:
    """OpenAI usage from the final delta of each choice (n choices of one prompt share its prompt tokens)."""
    prompt = sum(d.prompt_tokens for i, d in done.items() if i % n == 0)
    completion = sum(d.completion_tokens for d in done.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sampling_params(req, max_tokens: int | None, prompt_len: int, max_model_len: int, logprobs: int | None,
                    stop: list[str]) -> SamplingParams:
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the model's context of "
                            f"{max_model_len} tokens", "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    elif prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{prompt_len} and max_tokens asks for {max_tokens} more", "max_tokens",
                       "context_length_exceeded")
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos, logprobs=logprobs, seed=req.seed)


def normalize_stop(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])  # count and length: limits.check_sampling
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    return stops


def with_seed(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of a seeded request uses seed + index, so n choices differ but are reproducible."""
    if params.seed is None or index == 0:
        return params
    from dataclasses import replace

    return replace(params, seed=params.seed + index)


async def merge_streams(streams: list[AsyncIterator[StreamDelta]]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Interleave several generators as their deltas arrive: yields (choice index, delta)."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                yield 0, delta
        finally:  # closing this generator early must close the engine stream (which aborts the request) now
            await streams[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[StreamDelta]):
        try:
            async for delta in it:
                await q.put((i, delta))
        finally:
            await q.put(done)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await q.get()
            if item is done:
                remaining -= 1
                continue
            yield item
    finally:
        for t in tasks:  # cancelling a pump runs its generator's cleanup, which aborts the engine request
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
