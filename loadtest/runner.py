"""Runs a request plan against a server: paced release, concurrency cap, progress and a clean Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from dataclasses import dataclass, field

import httpx

from .client import RequestOptions, RequestRecord, send_request
from .workload import RequestSpec


@dataclass
class RunResult:
    records: list[RequestRecord]  # one per planned request, in plan order (unsent ones say 'not_sent')
    duration: float  # seconds from the first release to the last completion (or the interrupt)
    interrupted: bool = False
    warmup: list[RequestRecord] = field(default_factory=list)


class Progress:
    """A one-line bar on a terminal; on a pipe, a line every 10%. Written to stderr."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self._next_pct = 10

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.success
        if not self.enabled:
            return
        pct = 100 * self.done // self.total
        rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
        text = f"{self.done}/{self.total} done, {self.failed} failed, {rate:.1f} req/s"
        if self.tty:
            bar = "#" * (30 * self.done // self.total)
            self.stream.write(f"\r[{bar:<30}] {text}")
            if self.done == self.total:
                self.stream.write("\n")
        elif pct >= self._next_pct or self.done == self.total:
            self.stream.write(f"progress: {text}\n")
            self._next_pct = (pct // 10 + 1) * 10
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.done != self.total:
            self.stream.write("\n")
            self.stream.flush()


def _new_record(spec: RequestSpec) -> RequestRecord:
    return RequestRecord(spec.index, spec.model, spec.adapter, spec.input_len, spec.output_len)


async def run_plan(
    specs: list[RequestSpec],
    opts: RequestOptions,
    max_concurrency: int | None = None,
    timeout: float = 600.0,
    progress: bool = True,
    warmup: list[RequestSpec] | None = None,
) -> RunResult:
    """Release each request at its arrival time, at most max_concurrency in flight; Ctrl-C stops sending,
    cancels what is in flight (status 'cancelled') and still returns everything measured."""
    records = [_new_record(s) for s in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handler_installed = False

    def on_sigint() -> None:
        stop.set()
        print("\ninterrupted: stopping (Ctrl-C again to abort at once)", file=sys.stderr)
        loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C raises KeyboardInterrupt

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        handler_installed = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        pass
    cap = max_concurrency or max(1, len(specs))
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    http_timeout = httpx.Timeout(timeout, connect=min(timeout, 30.0), pool=None)
    bar = Progress(len(specs), progress)
    sem = asyncio.Semaphore(cap)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=http_timeout, trust_env=False) as client:
            warm = [_new_record(s) for s in warmup or []]
            for spec, rec in zip(warmup or [], warm):
                if stop.is_set():
                    break
                await send_request(client, spec, opts, rec, time.perf_counter())
            t0 = time.perf_counter()

            async def one(spec: RequestSpec, rec: RequestRecord) -> None:
                async with sem:
                    try:
                        await send_request(client, spec, opts, rec, t0)
                    except asyncio.CancelledError:
                        rec.status, rec.success = "cancelled", False
                        raise
                bar.update(rec)

            tasks = await _release(specs, records, one, t0, stop)
            if tasks:
                stopper = asyncio.ensure_future(stop.wait())
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                await asyncio.wait({gathered, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if stop.is_set():
                    for t in tasks:
                        t.cancel()
                await gathered
            duration = time.perf_counter() - t0
    finally:
        bar.close()
        if handler_installed and not stop.is_set():
            loop.remove_signal_handler(signal.SIGINT)
    return RunResult(records, duration, stop.is_set(), warm)


async def _release(specs, records, one, t0: float, stop: asyncio.Event) -> list[asyncio.Task]:
    """Start a task per request at its arrival time, until the plan ends or stop is set."""
    tasks = []
    for spec, rec in zip(specs, records):
        delay = spec.arrival - (time.perf_counter() - t0)
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        if stop.is_set():
            break
        tasks.append(asyncio.create_task(one(spec, rec)))
    return tasks
