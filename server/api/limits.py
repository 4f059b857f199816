"""Per-request bounds from the server's flags (n, logprobs, stop strings) and a cheap pre-tokenization cost estimate."""
from __future__ import annotations

from .errors import APIError

# Defaults when a runtime's config does not carry a flag (e.g. the fakes of unit tests).
DEFAULTS = {"max_n": 16, "max_logprobs": 20, "max_stop": 16, "max_stop_length": 256}
CHARS_PER_TOKEN = 4  # rough, for the admission estimate only; settled against real counts at the end


def limit(rt, name: str) -> int:
    return int(getattr(rt.config, name, None) or DEFAULTS[name])


def check_sampling(rt, body, logprobs: int | None) -> None:
    """400 for a request over the server's bounds, before anything is tokenized or rendered."""
    max_n = limit(rt, "max_n")
    if body.n > max_n:
        raise APIError(400, f"n is {body.n}; this server allows at most {max_n} choices per request", "n")
    max_lp = limit(rt, "max_logprobs")
    if logprobs is not None and logprobs > max_lp:
        param = "top_logprobs" if hasattr(body, "top_logprobs") else "logprobs"
        raise APIError(400, f"{param} is {logprobs}; this server returns at most {max_lp} alternatives", param)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    max_stop, max_len = limit(rt, "max_stop"), limit(rt, "max_stop_length")
    if len(stops) > max_stop:
        raise APIError(400, f"at most {max_stop} stop strings are allowed, got {len(stops)}", "stop")
    long = next((s for s in stops if len(s) > max_len), None)
    if long is not None:
        raise APIError(400, f"a stop string has {len(long)} characters; the limit is {max_len}", "stop")
    ids = body.stop_token_ids or []
    if len(ids) > max_stop:
        raise APIError(400, f"at most {max_stop} stop_token_ids are allowed, got {len(ids)}", "stop_token_ids")


def completion_shape(prompt) -> tuple[int, int]:
    """(number of prompts, estimated prompt tokens of each) without tokenizing."""
    if isinstance(prompt, str):
        return 1, len(prompt) // CHARS_PER_TOKEN + 1
    if not prompt:
        return 1, 1
    if all(isinstance(p, int) for p in prompt):
        return 1, len(prompt)
    if all(isinstance(p, str) for p in prompt):
        return len(prompt), max(len(p) for p in prompt) // CHARS_PER_TOKEN + 1
    return len(prompt), max(len(p) for p in prompt)


def chat_prompt_estimate(messages) -> int:
    chars = 0
    for m in messages:
        c = m.content
        chars += len(c) if isinstance(c, str) else sum(len(str(p.get("text", ""))) for p in c or [])
    return chars // CHARS_PER_TOKEN + 4 * len(messages) + 1


def estimate_tokens(rt, prompt_tokens: int, max_tokens: int | None, seqs: int) -> int:
    """Tokens a request may cost (prompt + completion, times its sequences), capped by the context."""
    ctx = int(getattr(rt, "max_model_len", 0) or 0) or (prompt_tokens + (max_tokens or 16))
    per = min(ctx, prompt_tokens + (max_tokens if max_tokens is not None else ctx))
    return max(1, per) * seqs
