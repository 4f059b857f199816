"""AsyncEngine: runs Engine.step() in its own thread and streams detokenized per-request output to asyncio."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator

from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .engine import Engine, RequestError
from .request import RequestOutput, SamplingParams, TokenLogprob

log = logging.getLogger("loramux.async_engine")
_ABORTED = object()  # queued into a stream by abort_all(): end it now with finish_reason "abort"


@dataclass
class StreamDelta:
    """New text of one sequence since the previous delta; the last one has finish_reason set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.dead: BaseException | None = None  # set if the engine thread crashed

    # ---- engine thread ----
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_commands()
                if not self.engine.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
                elif self.engine.last_step.num_requests == 0:
                    # Nothing runnable (e.g. an adapter still loading): wait briefly instead of spinning,
                    # which would starve the loader threads of the GIL.
                    self._wake.wait(timeout=0.002)
                    self._wake.clear()
        except BaseException as exc:  # a crash must not leave clients hanging: fail every open stream
            log.exception("engine thread crashed")
            self.dead = exc
            self._loop.call_soon_threadsafe(self._fail_all, f"engine failure: {exc}")

    def fail(self, exc: BaseException) -> None:
        """Mark the engine dead from another thread (e.g. a tensor-parallel worker died) and fail open streams."""
        self.dead = exc
        self._stop = True
        self._wake.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all, f"engine failure: {exc}")

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, adapter, tenant = cmd
                try:
                    self.engine.add_request(rid, prompt, params, adapter, tenant)
                except RequestError as exc:
                    self._loop.call_soon_threadsafe(self._fail, rid, str(exc))
            else:
                self.engine.abort(cmd[1])

    # ---- asyncio side ----
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _fail(self, rid: str, message: str) -> None:
        q = self._streams.get(rid)
        if q is not None:
            q.put_nowait(message)

    def _fail_all(self, message: str) -> None:
        for rid in list(self._streams):
            self._fail(rid, message)

    def num_open(self) -> int:
        return len(self._streams)

    def abort_all(self) -> int:
        """End every open stream now with finish_reason "abort" (and abort its engine request); event loop only."""
        for q in self._streams.values():
            q.put_nowait(_ABORTED)
        return len(self._streams)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter_id: str | None = None, tenant: str | None = None) -> AsyncIterator[StreamDelta]:
        """Yields StreamDelta chunks; aborts the request in the engine if the consumer goes away."""
        if self.dead is not None:
            raise RuntimeError("the engine has stopped")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        stops = StopStringMatcher(params.stop)
        finished = False
        num_output = 0
        self.engine.hint_adapter(adapter_id)  # its disk load may start while the step in flight runs
        self._commands.put(("add", request_id, prompt_ids, params, adapter_id, tenant))
        self._wake.set()
        try:
            while True:
                out = await q.get()
                if out is _ABORTED:  # the finally below aborts the engine request
                    yield StreamDelta("", [], finish_reason="abort", prompt_tokens=len(prompt_ids),
                                      completion_tokens=num_output)
                    return
                if isinstance(out, str):  # rejected or engine failure
                    finished = True
                    yield StreamDelta("", [], finish_reason="abort", prompt_tokens=len(prompt_ids), error=out)
                    return
                text, stopped = stops.feed(detok.push(out.new_token_ids))
                reason = out.finish_reason
                num_output = out.num_output_tokens
                if stopped:
                    reason = "stop"
                    self.abort(request_id)
                elif out.finished:
                    text += stops.feed(detok.flush())[0] + stops.flush()
                delta = StreamDelta(text, out.new_token_ids, out.new_logprobs or [], reason,
                                    out.num_prompt_tokens, out.num_output_tokens)
                if reason is not None:
                    finished = True
                    yield delta
                    return
                yield delta
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)
