"""Continuous batching: token budget, chunked prefill, preemption by recompute, adapter-slot admission (no torch)."""
from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from .block_manager import BlockManager
from .request import Request, RequestStatus


class AdapterGate(Protocol):
    """Grants GPU adapter slots. try_acquire: True if the adapter holds a slot now (refcount +1); False if it is
    still loading or every slot is busy; raises for an adapter that cannot be served.

    Optional methods, used when the gate has them: is_resident(id) (its weights are in a slot: such requests are
    preferred), weights_ready(id) (in CPU memory or a slot: only then may others be drained for it),
    prefetch(ids, urgent) (adapters of waiting requests, most urgent first; the set of those past the bound,
    which alone may take an idle slot another waiting request wants) and admitted(id, seconds_waited)."""

    def try_acquire(self, adapter_id: str) -> bool: ...

    def release(self, adapter_id: str) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_loras: int = 4
    # Fairness bound (like LoRAX's adapter cycle time, in steps): a request passed over this many steps for its
    # adapter (no slot, or overtaken by its tenant's requests for resident adapters) goes first, and running
    # adapters are drained so it gets a slot.
    max_adapter_wait_steps: int = 32


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
        self._blocked_steps: dict[str, int] = {}  # request id -> steps passed over for its adapter
        self._blocked_since: dict[str, float] = {}  # request id -> monotonic time of its first such step
        self.max_blocked_steps = 0  # largest blocked-step count of any admitted request (tests, benchmarks)

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
                self._forget(request_id)
                req.status = RequestStatus.FINISHED_ABORTED
                return req
        return None

    def _forget(self, request_id: str) -> None:
        self._blocked_steps.pop(request_id, None)
        self._blocked_since.pop(request_id, None)

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
        if self.waiting:
            self._admit(out, budget)
        return out

    # ---- admission ----
    def _admit(self, out: ScheduledBatch, budget: int) -> None:
        """Admit waiting requests: those past the fairness bound first (arrival order), then per tenant (fewest
        running sequences first), within a tenant requests whose adapter is resident before the others."""
        waiting = list(self.waiting)
        pos = {r.request_id: p for p, r in enumerate(waiting)}
        adapters = {r.adapter_id for r in self.running if r.adapter_id is not None}
        urgent = [r for r in waiting if r.adapter_id is not None and
                  self._blocked_steps.get(r.request_id, 0) >= self.config.max_adapter_wait_steps]
        gate = self.gate
        prefetch = getattr(gate, "prefetch", None)
        if prefetch is not None:  # adapters wanted soon, most urgent first
            prefetch(list(dict.fromkeys([r.adapter_id for r in urgent] + [r.adapter_id for r in waiting if
                                                                             r.adapter_id is not None])),
                     {r.adapter_id for r in urgent})
        drain, wait = self._held_back(urgent, adapters)
        resident = getattr(gate, "is_resident", None)
        hot = {a: a in adapters or (resident is not None and resident(a))
               for a in {r.adapter_id for r in waiting} - {None}}
        per_tenant = Counter(r.tenant for r in self.running)
        done: set[str] = set()
        rejected: set[str] = set()
        last_admitted: dict[str | None, int] = {}  # tenant -> queue position of its latest-arriving admission
        now = time.monotonic()
        for req in self._order(waiting, urgent, hot, per_tenant):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            aid = req.adapter_id
            if aid in drain:
                continue  # not counted as blocked: it holds a slot and gets requests again once drained
            if aid in wait:
                rejected.add(req.request_id)
                continue
            ok = self._admit_adapter(req, adapters, out)
            if ok is None:  # failed: reported in out.failed
                done.add(req.request_id)
                continue
            if not ok:
                rejected.add(req.request_id)
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.blocks.allocate(req, n):
                if aid is not None and gate is not None:
                    gate.release(aid)
                break
            done.add(req.request_id)
            self._started(req, aid, now)
            per_tenant[req.tenant] += 1
            last_admitted[req.tenant] = max(last_admitted.get(req.tenant, -1), pos[req.request_id])
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        if done:
            self.waiting = deque(r for r in waiting if r.request_id not in done)
        for req in self.waiting:  # passed over for its adapter: refused a slot, or overtaken by its tenant
            rid = req.request_id
            if req.adapter_id is not None and req.adapter_id not in drain and \
                    (rid in rejected or pos[rid] < last_admitted.get(req.tenant, -1)):
                self._blocked_since.setdefault(rid, now)
                if out.requests:  # a step that serves nobody favours nobody: it does not count
                    self._blocked_steps[rid] = self._blocked_steps.get(rid, 0) + 1

    def _started(self, req: Request, aid: str | None, now: float) -> None:
        steps = self._blocked_steps.pop(req.request_id, 0)
        since = self._blocked_since.pop(req.request_id, now)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if aid is None:
            return
        self.max_blocked_steps = max(self.max_blocked_steps, steps)
        admitted = getattr(self.gate, "admitted", None)
        if admitted is not None:
            admitted(aid, now - since)

    @staticmethod
    def _order(waiting: list[Request], urgent: list[Request], hot: dict, per_tenant: Counter) -> Iterator[Request]:
        """Urgent requests in arrival order, then the tenant with the fewest running sequences (ties: the one
        whose next request arrived first) gives its next request, resident adapters first. per_tenant is read
        live, so admissions made meanwhile count."""
        yield from urgent
        skip = {r.request_id for r in urgent}
        queues: dict[str | None, tuple[deque, deque]] = {}
        for p, r in enumerate(waiting):
            if r.request_id not in skip:
                q = queues.setdefault(r.tenant, (deque(), deque()))
                q[0 if r.adapter_id is None or hot[r.adapter_id] else 1].append((p, r))

        def key(t) -> tuple:  # queue positions are unique, so the tenant itself is never compared
            return per_tenant[t], min(q[0][0] for q in queues[t] if q), t

        heap = [key(t) for t in queues]
        heapq.heapify(heap)
        while heap:  # only the tenant just served changes its key: pop it, serve one, push it back
            t = heapq.heappop(heap)[2]
            first, second = queues[t]
            yield (first or second).popleft()[1]
            if first or second:
                heapq.heappush(heap, key(t))

    def _held_back(self, urgent: list[Request], adapters: set[str]) -> tuple[set[str], set[str]]:
        """Adapters not admitted this step so that adapters past the bound get slots: when every slot is taken,
        the running adapters with the least work left drain (no new requests) and adapters without a slot wait."""
        if not urgent:
            return set(), set()
        ready = getattr(self.gate, "weights_ready", None)
        needy = [a for a in dict.fromkeys(r.adapter_id for r in urgent)
                 if a not in adapters and (ready is None or ready(a))]
        short = len(needy) - (self.config.max_loras - len(adapters))
        if short <= 0:
            return set(), set()
        wanted = {r.adapter_id for r in urgent}
        left: Counter = Counter()
        for r in self.running:
            if r.adapter_id is not None and r.adapter_id not in wanted:
                left[r.adapter_id] += r.num_prompt_tokens - min(r.num_computed_tokens, r.num_prompt_tokens) + \
                    r.params.max_tokens - len(r.output_token_ids)
        drain = sorted(left, key=lambda a: (left[a], a))[:short]
        others = {r.adapter_id for r in self.waiting} - adapters - wanted - {None}
        return set(drain), others

    def _admit_adapter(self, req: Request, adapters: set[str], out: ScheduledBatch) -> bool | None:
        aid = req.adapter_id
        if aid is None or self.gate is None:
            return True
        if aid not in adapters and len(adapters) >= self.config.max_loras:
            return False
        try:
            acquired = self.gate.try_acquire(aid)
        except Exception as exc:  # adapter deleted or invalid since the request was accepted
            req.status = RequestStatus.FINISHED_ABORTED
            self._forget(req.request_id)
            out.failed.append((req, str(exc)))
            return None
        if acquired:
            adapters.add(aid)
        return acquired
