"""POST /v1/completions: OpenAI legacy completions, non-streaming and SSE streaming."""
from __future__ import annotations

from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .context import set_request_id
from .errors import APIError, error_body
from .generation import (admit, check_request, collect_streams, guard_sse, merge_streams, new_id, normalize_stop, now,
                         open_stream, sampling_params, sse, unless_disconnected, usage_of, with_seed)
from .limits import check_sampling, completion_shape, estimate_tokens
from .schemas import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo

router = APIRouter()


def _prompts(rt, prompt) -> list[list[int]]:
    """Normalize the four OpenAI prompt forms into token-id lists."""
    if isinstance(prompt, str):
        return [rt.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [rt.tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    for ids in prompts:
        if not ids:
            raise APIError(400, "a token-id prompt must not be empty", "prompt")
        bad = next((t for t in ids if not 0 <= t < rt.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{rt.vocab_size - 1})", "prompt")
    return prompts


def _logprobs_block(rt, deltas, offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for d in deltas:
        for entry in d.logprobs:
            tok = rt.tokenizer.token_text(entry.token_id)
            lp.text_offset.append(offset)
            offset += len(tok)
            lp.tokens.append(tok)
            lp.token_logprobs.append(entry.logprob)
            lp.top_logprobs.append({rt.tokenizer.token_text(t): v for t, v in entry.top} if entry.top else None)
    return lp


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request):
    rt = request.app.state.runtime
    check_request(rt, body, "/v1/completions")
    check_sampling(rt, body, body.logprobs)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo together with logprobs is not supported", "echo")
    n_prompts, est_prompt = completion_shape(body.prompt)
    seqs = n_prompts * body.n
    ticket = admit(request, seqs, estimate_tokens(rt, est_prompt, body.max_tokens, seqs))
    streaming = False
    try:
        response = await _create(rt, body, request, ticket)
        streaming = isinstance(response, StreamingResponse)  # from here the stream releases the ticket
        return response
    finally:
        if not streaming:
            ticket.release()


async def _create(rt, body: CompletionRequest, request: Request, ticket):
    adapter_id = rt.resolve_model(body.model, request)
    stops = normalize_stop(body.stop)
    prompts = _prompts(rt, body.prompt)
    params = [sampling_params(body, body.max_tokens, len(p), rt.max_model_len, body.logprobs, stops)
              for p in prompts]
    rid, created = new_id("cmpl"), now()
    set_request_id(request, rid)
    model_name = body.model or rt.model_name
    streams, prefixes = [], []
    for pi, ids in enumerate(prompts):
        for j in range(body.n):
            sub = with_seed(params[pi], j)
            streams.append(open_stream(request, f"{rid}-{pi}-{j}", ids, sub, adapter_id))
            prefixes.append(rt.tokenizer.decode(ids) if body.echo else "")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(rt, rid, created, model_name, streams, prefixes, body.n, include_usage)
        return StreamingResponse(guard_sse(events, ticket), media_type="text/event-stream")

    async def collect() -> CompletionResponse:
        texts, deltas, done = await collect_streams(streams)
        choices = [CompletionChoice(index=i, text=prefixes[i] + texts[i],
                                    finish_reason=done[i].finish_reason if i in done else None,
                                    logprobs=_logprobs_block(rt, deltas[i], len(prefixes[i]))
                                    if body.logprobs is not None else None) for i in range(len(streams))]
        return CompletionResponse(id=rid, created=created, model=model_name, choices=choices,
                                  usage=UsageInfo(**usage_of(done, body.n)))

    return await unless_disconnected(request, collect())


async def _stream(rt, rid, created, model_name, streams, prefixes, n: int, include_usage: bool):
    usage = UsageInfo()
    counted = set()  # prompt indices already in usage (n choices share one prompt)

    def chunk(index: int, text: str, reason, logprobs=None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    for i, prefix in enumerate(prefixes):
        if prefix:
            yield sse(chunk(i, prefix, None))
    async with aclosing(merge_streams(streams)) as merged:
        async for i, d in merged:
            if d.error:
                yield sse(error_body(503 if "engine" in d.error else 400, d.error))
                break
            lp = _logprobs_block(rt, [d], 0).model_dump() if d.logprobs else None
            if d.text or d.finish_reason is not None or lp:
                yield sse(chunk(i, d.text, d.finish_reason, lp))
            if d.finish_reason is not None:
                usage.completion_tokens += d.completion_tokens
                if i // n not in counted:
                    counted.add(i // n)
                    usage.prompt_tokens += d.prompt_tokens
    if include_usage:
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                   "choices": [], "usage": usage.model_dump()})
    yield sse("[DONE]")
