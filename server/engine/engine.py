"""The synchronous engine: add/abort requests; step() = schedule -> execute -> update."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from loramux.kernels.backend import env_mode

from .block_manager import BlockManager
from .request import Request, RequestOutput, RequestStatus, SamplingParams, TokenLogprob
from .scheduler import AdapterGate, ScheduledBatch, Scheduler, SchedulerConfig

log = logging.getLogger("loramux.engine")
ASYNC_DECODE_ENV = "LORAMUX_ASYNC_DECODE"


class RequestError(ValueError):
    """A request the engine cannot accept (e.g. prompt longer than the context)."""


@dataclass
class StepStats:
    num_requests: int = 0
    num_tokens: int = 0
    step_time: float = 0.0  # seconds, whole step
    model_time: float = 0.0  # seconds inside the runner's forward + sampling


class Engine:
    """Owns the scheduler and drives a runner with `execute(batch) -> {request_id: (token, TokenLogprob|None)}`."""

    def __init__(self, runner, sched_config: SchedulerConfig, num_blocks: int, block_size: int,
                 eos_token_ids: list[int], gate: AdapterGate | None = None):
        self.runner = runner
        self.config = sched_config
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(sched_config, self.blocks, gate)
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.last_step = StepStats()
        self._rng = random.Random()
        # Decode steps launched one ahead (_launch_next): LORAMUX_ASYNC_DECODE=auto (on for a CUDA runner, where the
        # device would otherwise idle during the host's bookkeeping), 1 (also on CPU, for tests) or 0.
        mode = env_mode(ASYNC_DECODE_ENV)
        on_cuda = getattr(getattr(runner, "device", None), "type", None) == "cuda"
        self.async_decode = (mode == "on" or (mode == "auto" and on_cuda)) and \
            getattr(runner, "parallel", None) is None and hasattr(runner, "launch")
        self._ahead: tuple[ScheduledBatch, object] | None = None  # launched, tokens not yet read
        self.steps_launched_ahead = 0

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    adapter_id: str | None = None, tenant: str | None = None) -> Request:
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens; the context is "
                               f"{self.config.max_model_len}, leaving no room to generate")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, list(prompt_token_ids), params, adapter_id, seed=seed, arrival=time.monotonic(),
                      tenant=tenant)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def hint_adapter(self, adapter_id: str | None) -> None:
        """A request for adapter_id is about to be added (callable from any thread): lets the gate start loading
        it now (SlotGate.hint). Never raises: the request itself reports any problem with the adapter."""
        hint = getattr(self.scheduler.gate, "hint", None)
        if adapter_id is not None and hint is not None:
            try:
                hint(adapter_id)
            except Exception:  # noqa: BLE001 - a hint is advisory
                log.debug("adapter hint for %r failed", adapter_id, exc_info=True)

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)
        return req is not None

    def has_work(self) -> bool:
        return self._ahead is not None or self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        outputs: list[RequestOutput] = []
        if self._ahead is not None:  # launched by the previous step() before it read its own tokens
            (batch, launched), self._ahead = self._ahead, None
        else:
            batch = self.scheduler.schedule()
            outputs = [self._finished_output(req, "abort") for req, _ in batch.failed]
            for req, reason in batch.failed:
                log.warning("request %s failed: %s", req.request_id, reason)
                self.requests.pop(req.request_id, None)
            if batch.empty:
                self.last_step = StepStats(step_time=time.perf_counter() - t0)
                return outputs
            launched = self.runner.launch(batch, device_tokens=True) if self.async_decode else None
        t1 = time.perf_counter()
        if launched is None:
            sampled = self.runner.execute(batch)
        else:
            self._ahead = self._launch_next(batch, launched)
            sampled = self.runner.finish(launched)
        model_time = time.perf_counter() - t1
        outputs.extend(self._update(batch, sampled, pre_applied=self._ahead is not None))
        self.last_step = StepStats(len(batch.requests), batch.num_tokens, time.perf_counter() - t0, model_time)
        return outputs

    def _launch_next(self, batch: ScheduledBatch, launched) -> tuple[ScheduledBatch, object] | None:
        """Launch the next decode step before reading this one's tokens, so the device never waits for the host's
        bookkeeping: its input ids come from this step's device-side tokens. Only when that step is exactly what
        schedule() would make: every running request decoding, in order, no free seat for a waiting request, none
        finishing by length now, and blocks for all. This step's bookkeeping is applied first with a placeholder
        token that _update fills in; a request that stops on a token now has its next-step row discarded."""
        sch, reqs = self.scheduler, batch.requests
        # Waiting requests could join only if a seat is free; a seat freed by a stop token at N is filled a step late.
        admit = sch.waiting and len(sch.running) < self.config.max_num_seqs
        if launched.tokens_dev is None or not launched.feeds_next or admit or \
                len(reqs) != len(sch.running) or any(a is not b for a, b in zip(reqs, sch.running)) or \
                any(n != 1 for n in batch.num_new_tokens) or \
                sum(self.blocks.extra_blocks_needed(r, 2) for r in reqs) > self.blocks.num_free:
            return None
        for req in reqs:
            if self.requests.get(req.request_id) is not req or len(req.output_token_ids) + 1 >= \
                    req.params.max_tokens or req.num_tokens + 1 >= self.config.max_model_len:
                return None
        for req in reqs:
            req.num_computed_tokens += 1
            req.output_token_ids.append(0)  # placeholder for this step's token (the next step reads it on device)
            self.blocks.allocate(req, 1)
        nxt = ScheduledBatch(requests=list(reqs), num_new_tokens=[1] * len(reqs))
        self.steps_launched_ahead += 1
        return nxt, self.runner.launch(nxt, device_tokens=True, ids_from=launched)

    def _update(self, batch: ScheduledBatch, sampled: dict, pre_applied: bool = False) -> list[RequestOutput]:
        """Apply a step's tokens. pre_applied: _launch_next already advanced the requests and appended a
        placeholder for the token. Requests finished or aborted while this step ran ahead are skipped."""
        outputs = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            if self.requests.get(req.request_id) is not req:
                continue
            if not pre_applied:
                req.num_computed_tokens += n
            if req.request_id not in sampled:
                continue  # a prefill chunk that did not reach the end of the prompt
            token, logprob = sampled[req.request_id]
            if pre_applied:
                req.output_token_ids[-1] = token
            else:
                req.output_token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self.scheduler.finish(req, status)
                self.requests.pop(req.request_id, None)
            outputs.append(RequestOutput(
                req.request_id, [token], [logprob] if logprob is not None else None, status is not None,
                status.value if status is not None else None, req.num_prompt_tokens, len(req.output_token_ids)))
        return outputs

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _finished_output(req: Request, reason: str) -> RequestOutput:
        return RequestOutput(req.request_id, [], None, True, reason, req.num_prompt_tokens,
                             len(req.output_token_ids))


__all__ = ["Engine", "RequestError", "StepStats", "TokenLogprob"]
