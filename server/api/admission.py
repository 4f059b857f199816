"""Admission before any expensive work: per-tenant token buckets (429) and a global bound on waiting work (503)."""
from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from typing import Callable

from .errors import APIError

RETRY_FULL_S = 1  # Retry-After of a 503 (server full or draining): another replica, or this one a moment later


class TokenBucket:
    """`rate` units per second, holding at most `capacity`. A cost above the capacity is admitted once the bucket
    is full and leaves it in debt, so every request can pass eventually and the average rate still holds."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = float(rate), max(1.0, float(capacity))
        self.level, self._t = self.capacity, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._t) * self.rate)
        self._t = now

    def wait_s(self, cost: float) -> float:
        """Seconds until `cost` may be taken (0: now)."""
        self._refill()
        need = min(cost, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class _TicketState:
    """Everything a ticket's release needs (kept apart from the ticket so a finalizer can run it)."""

    def __init__(self, admission: "Admission", tenant, seqs: int, tokens: int, kind: str):
        self.admission, self.tenant, self.seqs, self.tokens, self.kind = admission, tenant, seqs, tokens, kind
        self.used: int | None = None
        self.callbacks: list[Callable[[], None]] = []
        self.done = False

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        self.admission._release(self)
        for fn in self.callbacks:
            try:
                fn()
            except Exception:  # noqa: BLE001 (cleanup of one hold must not skip the others)
                import logging

                logging.getLogger("loramux.api").exception("ticket cleanup failed")


def _release_later(loop, state: _TicketState) -> None:
    """Finalizer: run the release on the event loop (a collection may happen while some lock is held)."""
    if state.done:
        return
    try:
        loop.call_soon_threadsafe(state.release)
    except (AttributeError, RuntimeError):  # no loop, or it is closed: release right here
        state.release()


class Ticket:
    """An admitted request. release() (idempotent) gives back its place; if a ticket is dropped without a release
    (e.g. a streaming response whose body never started), garbage collection releases it."""

    def __init__(self, state: _TicketState):
        self._state = state
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        weakref.finalize(self, _release_later, loop, state)

    def on_release(self, fn: Callable[[], None]) -> None:
        self._state.callbacks.append(fn)

    def add_tokens(self, n: int) -> None:
        """Tokens actually processed (prompt + completion); at release the estimate is settled against them."""
        self._state.used = (self._state.used or 0) + int(n)

    def release(self) -> None:
        self._state.release()


class Admission:
    """max_in_flight bounds admitted sequences (running + waiting); buckets are per tenant (None = open mode)."""

    def __init__(self, max_in_flight: int, requests_per_s: float = 0.0, tokens_per_s: float = 0.0,
                 burst_s: float = 10.0, tenant_limits: dict[str, dict] | None = None, max_uploads: int = 2):
        self.max_in_flight, self.burst_s, self.max_uploads = max_in_flight, burst_s, max_uploads
        self.defaults = {"requests_per_s": requests_per_s, "tokens_per_s": tokens_per_s}
        self.tenant_limits = tenant_limits or {}
        self.in_flight = self.peak = self.uploads = 0
        self.rejected = {"rate_limited": 0, "full": 0}
        self._buckets: dict[tuple, TokenBucket] = {}
        self._lock = threading.RLock()  # reentrant: a finalizer may release a ticket inside admit()

    def _bucket(self, tenant, what: str) -> TokenBucket | None:
        rate = self.tenant_limits.get(tenant, {}).get(what, self.defaults[what])
        if not rate:
            return None
        b = self._buckets.get((tenant, what))
        if b is None or b.rate != rate:
            b = self._buckets[(tenant, what)] = TokenBucket(rate, rate * self.burst_s)
        return b

    def admit(self, tenant: str | None, seqs: int, tokens: int, kind: str = "generate") -> Ticket:
        """Admit or raise: 503 + Retry-After when the server is full, 429 + Retry-After when the tenant is over
        its rate. Nothing is charged for a refused request."""
        with self._lock:
            if kind == "upload":
                if self.uploads >= self.max_uploads:
                    self.rejected["full"] += 1
                    raise APIError(503, f"{self.uploads} adapter uploads are in progress (the limit is "
                                        f"{self.max_uploads}); retry shortly", None, "server_busy",
                                   {"Retry-After": str(RETRY_FULL_S)})
            elif self.in_flight and self.in_flight + seqs > self.max_in_flight:
                self.rejected["full"] += 1
                raise APIError(503, f"the server is at capacity ({self.in_flight} sequences admitted, the bound is "
                                    f"{self.max_in_flight}); retry shortly or on another replica", None,
                               "server_overloaded", {"Retry-After": str(RETRY_FULL_S)})
            req_b, tok_b = self._bucket(tenant, "requests_per_s"), self._bucket(tenant, "tokens_per_s")
            waits = [(req_b.wait_s(1), f"{req_b.rate:g} requests/s")] if req_b else []
            waits += [(tok_b.wait_s(tokens), f"{tok_b.rate:g} tokens/s")] if tok_b and tokens else []
            worst = max(waits, default=(0.0, ""))
            if worst[0] > 0:
                self.rejected["rate_limited"] += 1
                retry = max(1, math.ceil(worst[0]))
                who = f"tenant {tenant!r}" if tenant is not None else "this server's client"
                raise APIError(429, f"{who} is over its rate limit of {worst[1]}; retry after {retry} s", None,
                               "rate_limit_exceeded", {"Retry-After": str(retry)})
            if req_b:
                req_b.take(1)
            if tok_b:
                tok_b.take(tokens)
            if kind == "upload":
                self.uploads += 1
            else:
                self.in_flight += seqs
                self.peak = max(self.peak, self.in_flight)
        return Ticket(_TicketState(self, tenant, seqs, tokens, kind))

    def _release(self, st: _TicketState) -> None:
        with self._lock:
            if st.kind == "upload":
                self.uploads -= 1
            else:
                self.in_flight -= st.seqs
            tok_b = self._bucket(st.tenant, "tokens_per_s")
            if tok_b is not None and st.used is not None and st.tokens:
                tok_b.give(st.tokens - st.used)  # settle the estimate: refund, or charge what it missed

    def snapshot(self) -> dict:
        with self._lock:
            return {"in_flight": self.in_flight, "peak": self.peak, "uploads": self.uploads,
                    "max_in_flight": self.max_in_flight, **self.rejected}
