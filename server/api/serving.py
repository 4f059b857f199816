"""The uvicorn server of an app: header-size limit with JSON errors, and a graceful drain on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from typing import Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

log = logging.getLogger("loramux.serve")
FLUSH_S = 5.0  # after aborting, how long aborted responses get to reach their clients


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, but a request it cannot parse gets OpenAI's error shape: 431 when the headers are
    over h11_max_incomplete_event_size, 400 otherwise (uvicorn itself sends plain text 400 in both cases)."""

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or 16 * 1024  # h11's own default
        try:
            too_big = len(self.conn.trailing_data[0]) > limit
        except Exception:  # noqa: BLE001 (best effort: fall back to a plain 400)
            too_big = False
        status = 431 if too_big else 400
        text = (f"the request headers are larger than the limit of {limit} bytes" if too_big
                else "invalid HTTP request")
        body = json.dumps(error_body(status, text, None, "headers_too_large" if too_big else "bad_http")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass
        self.transport.close()


async def drain(app, timeout: float, hurry: Callable[[], bool] = lambda: False) -> dict:
    """Stop taking work (/ready and new requests answer 503), let admitted requests finish for up to `timeout`
    seconds, then abort the rest (each ends with finish_reason "abort"). Returns what happened."""
    rt, adm = app.state.runtime, app.state.admission
    loop = asyncio.get_running_loop()
    rt.draining = True
    start = loop.time()
    log.info("draining: %d sequences and %d uploads in flight; waiting up to %.1f s", adm.in_flight, adm.uploads,
             timeout)
    while (adm.in_flight or adm.uploads) and loop.time() - start < timeout and not hurry():
        await asyncio.sleep(0.05)
    aborted = 0
    if adm.in_flight:
        aborted = rt.async_engine.abort_all()
        log.warning("drain: %d sequences still running after %.1f s: aborted", aborted, loop.time() - start)
        end = loop.time() + FLUSH_S
        while adm.in_flight and loop.time() < end:
            await asyncio.sleep(0.02)
            rt.async_engine.abort_all()  # also streams that only started after the first abort
    log.info("drained in %.1f s", loop.time() - start)
    return {"aborted": aborted, "seconds": loop.time() - start}


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before the usual shutdown; a second signal
    aborts what is left at once. Exits normally (status 0): the signal is not re-raised afterwards."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout: float):
        super().__init__(config)
        self.app_for_drain, self.drain_timeout = app, drain_timeout
        self.drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hurry = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self._loop is None or self.should_exit:
            self.force_exit = self.should_exit  # a signal during uvicorn's own shutdown: stop waiting
            self.should_exit = True
        elif self.drain_task is None:
            log.info("received %s: graceful drain (up to %.1f s)", signal.Signals(sig).name, self.drain_timeout)
            self._loop.call_soon_threadsafe(self.start_drain)
        else:
            log.warning("received %s again: aborting the remaining requests now", signal.Signals(sig).name)
            self._hurry = True

    def start_drain(self) -> asyncio.Task:
        if self.drain_task is None:
            async def run() -> None:
                try:
                    await drain(self.app_for_drain, self.drain_timeout, lambda: self._hurry)
                finally:
                    self.should_exit = True

            self.drain_task = asyncio.ensure_future(run())
        return self.drain_task


def build_server(app, cfg) -> DrainingServer:
    """The server `loramux serve` runs (tests use it too): h11 with the header limit, drain on signals."""
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, http=JsonErrorH11Protocol,
                          h11_max_incomplete_event_size=cfg.max_header_bytes, timeout_graceful_shutdown=FLUSH_S,
                          limit_concurrency=cfg.max_connections or None, server_header=False)
    return DrainingServer(ucfg, app, cfg.drain_timeout)
