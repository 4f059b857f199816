"""Continuous batching: token budget, chunked prefill, preemption by recompute, adapter-slot admission (no torch)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from .block_manager import BlockManager
from .request import Request, RequestStatus


class AdapterGate(Protocol):
    """Grants GPU adapter slots. try_acquire: True if the adapter holds a slot now (refcount +1); False if it is
    still loading or every slot is busy; raises for an adapter that cannot be served."""

    def try_acquire(self, adapter_id: str) -> bool: ...

    def release(self, adapter_id: str) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_loras: int = 4
    max_adapter_wait_steps: int = 32  # a request blocked on a slot waits at most about this many steps


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[tuple[Request, str]] = field(default_factory=list)  # adapter could not be served

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, gate: AdapterGate | None = None):
        self.config, self.blocks, self.gate = config, blocks, gate
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._blocked_steps: dict[str, int] = {}  # request id -> steps spent waiting for an adapter slot

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        for req in self.running:
            if req.request_id == request_id:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                return req
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                self._blocked_steps.pop(request_id, None)
                req.status = RequestStatus.FINISHED_ABORTED
                return req
        return None

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a running request and give back its blocks and adapter slot."""
        self.running.remove(req)
        self._leave(req)
        req.status = status

    def _leave(self, req: Request) -> None:
        self.blocks.free(req)
        if req.adapter_id is not None and self.gate is not None:
            self.gate.release(req.adapter_id)

    def _preempt(self, req: Request, out: ScheduledBatch) -> None:
        self.running.remove(req)
        self._leave(req)
        req.status, req.num_computed_tokens = RequestStatus.PREEMPTED, 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        # 1. Running requests first, oldest first; preempt the newest when the cache is full.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.allocate(req, n):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted; nothing after it can run either
        if out.preempted:
            return out
        # 2. Admit waiting requests in arrival order while budget, sequence slots and adapter slots allow.
        adapters = {r.adapter_id for r in self.running if r.adapter_id is not None}
        starving = self._starving_adapter()
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            ok = self._admit_adapter(req, adapters, starving, out)
            if ok is None:
                continue  # failed: reported in out.failed
            if not ok:
                skipped.append(req)
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.blocks.allocate(req, n):
                if req.adapter_id is not None and self.gate is not None:
                    self.gate.release(req.adapter_id)
                self.waiting.appendleft(req)
                break
            self._blocked_steps.pop(req.request_id, None)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        for req in reversed(skipped):
            self.waiting.appendleft(req)
            self._blocked_steps[req.request_id] = self._blocked_steps.get(req.request_id, 0) + 1
        return out

    def _starving_adapter(self) -> str | None:
        """The adapter of the longest-blocked request once it has waited past the bound."""
        for req in self.waiting:
            if req.adapter_id is not None and \
                    self._blocked_steps.get(req.request_id, 0) >= self.config.max_adapter_wait_steps:
                return req.adapter_id
        return None

    def _admit_adapter(self, req: Request, adapters: set[str], starving: str | None,
                       out: ScheduledBatch) -> bool | None:
        aid = req.adapter_id
        if aid is None or self.gate is None:
            return True
        if starving is not None and aid != starving:
            return False  # let slots drain to the adapter that has waited too long
        if aid not in adapters and len(adapters) >= self.config.max_loras:
            return False
        try:
            acquired = self.gate.try_acquire(aid)
        except Exception as exc:  # adapter deleted or invalid since the request was accepted
            req.status = RequestStatus.FINISHED_ABORTED
            self._blocked_steps.pop(req.request_id, None)
            out.failed.append((req, str(exc)))
            return None
        if acquired:
            adapters.add(aid)
        return acquired
