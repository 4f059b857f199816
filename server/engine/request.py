"""Request types shared by scheduler, engine and API: SamplingParams, Request, RequestOutput (no torch)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI names; -1 / 0.0 / 1.0 mean "off")."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = no logprobs; k >= 0 = chosen token's logprob + k alternatives
    seed: int | None = None  # None: the engine draws one, so every request has a fixed noise stream
    n: int = 1  # expanded into n sequences by AsyncEngine; the engine sees n == 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    """One sequence being generated. Token ids only; text lives in the AsyncEngine's detokenizer."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None = None  # None = base model
    seed: int = 0  # noise stream of this sequence: params.seed, or drawn by the engine
    arrival: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    tenant: str | None = None  # who asked (API key's tenant; None = open mode): per-tenant fair share

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, n: int) -> list[int]:
        """all_token_ids[start:start+n] without copying the whole history (decode reads one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:start - p + n]
        if start + n <= p:
            return self.prompt_token_ids[start:start + n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:start + n - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestOutput:
    """What one engine step produced for one request (new tokens since the last output)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    num_prompt_tokens: int
    num_output_tokens: int
