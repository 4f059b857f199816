"""POST /v1/chat/completions: messages rendered with the (adapter's own or base) chat template; SSE streaming."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .context import set_request_id
from .errors import APIError, error_body
from .generation import (admit, check_request, collect_streams, guard_sse, merge_streams, new_id, normalize_stop, now,
                         open_stream, sampling_params, sse, unless_disconnected, usage_of, with_seed)
from .limits import chat_prompt_estimate, check_sampling, estimate_tokens
from .schemas import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessageOut,
                      ChatTokenLogprob, TopLogprob, UsageInfo)

router = APIRouter()


def _message(m) -> dict:
    """A message as plain data for the template; text content parts are joined into one string."""
    msg = m.model_dump(exclude_none=True)
    content = m.content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"content part {i} has type {part.get('type')!r}; only text parts are "
                                    "supported", "messages")
            texts.append(part["text"])
        msg["content"] = "\n".join(texts)
    elif content is None:
        msg["content"] = ""
    return msg


def render_prompt(rt, body: ChatCompletionRequest, adapter_id: str | None) -> list[int]:
    service = getattr(rt, "adapters", None)
    template = service.chat_template(adapter_id) if adapter_id is not None and service is not None else None
    messages = [_message(m) for m in body.messages]
    try:
        text = rt.tokenizer.render_chat(messages, add_generation_prompt=body.add_generation_prompt,
                                        template=template)
    except ValueError as exc:  # the tokenizer's ChatTemplateError: no template, bad template, render failure
        raise APIError(400, f"model {body.model or rt.model_name!r}: {exc}", "messages",
                       "chat_template_error") from exc
    ids = rt.tokenizer.encode(text, add_special_tokens=False)  # the template writes its own special tokens
    if not ids:
        raise APIError(400, "the chat template rendered an empty prompt", "messages")
    return ids


def _logprobs(rt, deltas) -> ChatLogprobs:
    content = []
    for d in deltas:
        for e in d.logprobs:
            tok = rt.tokenizer.token_text(e.token_id)
            top = [_top(rt, t, lp) for t, lp in e.top]
            content.append(ChatTokenLogprob(token=tok, logprob=max(e.logprob, -9999.0),
                                            bytes=list(tok.encode("utf-8")), top_logprobs=top))
    return ChatLogprobs(content=content)


def _top(rt, token_id: int, logprob: float) -> TopLogprob:
    tok = rt.tokenizer.token_text(token_id)
    return TopLogprob(token=tok, logprob=max(logprob, -9999.0), bytes=list(tok.encode("utf-8")))


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    rt = request.app.state.runtime
    check_request(rt, body, "/v1/chat/completions")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    check_sampling(rt, body, body.top_logprobs)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    ticket = admit(request, body.n, estimate_tokens(rt, chat_prompt_estimate(body.messages), max_tokens, body.n))
    streaming = False
    try:
        response = await _create(rt, body, request, ticket, max_tokens)
        streaming = isinstance(response, StreamingResponse)  # from here the stream releases the ticket
        return response
    finally:
        if not streaming:
            ticket.release()


async def _create(rt, body: ChatCompletionRequest, request: Request, ticket, max_tokens: int | None):
    adapter_id = rt.resolve_model(body.model, request)
    stops = normalize_stop(body.stop)
    # A tenant's own chat template runs in jinja's sandbox, on a worker thread: a slow one cannot stall the loop.
    ids = await asyncio.to_thread(render_prompt, rt, body, adapter_id)
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, len(ids), rt.max_model_len, k, stops)
    rid, created = new_id("chatcmpl"), now()
    set_request_id(request, rid)
    model_name = body.model or rt.model_name
    streams = [open_stream(request, f"{rid}-{j}", ids, with_seed(params, j), adapter_id) for j in range(body.n)]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(rt, rid, created, model_name, streams, body.n, include_usage, body.logprobs)
        return StreamingResponse(guard_sse(events, ticket), media_type="text/event-stream")

    async def collect() -> ChatCompletionResponse:
        texts, deltas, done = await collect_streams(streams)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=texts[i]),
                              finish_reason=done[i].finish_reason if i in done else "stop",
                              logprobs=_logprobs(rt, deltas[i]) if body.logprobs else None) for i in range(body.n)]
        return ChatCompletionResponse(id=rid, created=created, model=model_name, choices=choices,
                                      usage=UsageInfo(**usage_of(done, body.n)))

    return await unless_disconnected(request, collect())


async def _stream(rt, rid, created, model_name, streams, n: int, include_usage: bool, logprobs: bool):
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
    if include_usage:
        base["usage"] = None  # as OpenAI: every chunk has usage null, the last one carries it

    def chunk(index: int, delta: dict, reason=None, lp=None) -> str:
        return sse(dict(base, choices=[{"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}]))

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    done: dict = {}
    async with aclosing(merge_streams(streams)) as merged:
        async for i, d in merged:
            if d.error:
                yield sse(error_body(503 if "engine" in d.error else 400, d.error))
                break
            lp = _logprobs(rt, [d]).model_dump() if logprobs and d.logprobs else None
            if d.text or lp:
                yield chunk(i, {"content": d.text}, None, lp)
            if d.finish_reason is not None:
                done[i] = d
                yield chunk(i, {}, d.finish_reason)
    if include_usage:
        yield sse(dict(base, choices=[], usage=usage_of(done, n)))
    yield sse("[DONE]")
