"""`loramux serve --tensor-parallel-size N`: spawn ranks 1..N-1, join rank 0 to their group, watch them."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from .parallel_state import TPState, destroy_tensor_parallel, init_tensor_parallel
from .tp_worker import free_port, stop_workers, worker_loop

log = logging.getLogger("loramux.distributed")
CMD_TIMEOUT_S = 365 * 24 * 3600.0  # workers of an idle server wait for rank 0's next command this long
COLLECTIVE_TIMEOUT_S = float(os.environ.get("LORAMUX_TP_TIMEOUT_S", "300"))  # one forward collective at most
POLL_S = 0.5  # how often rank 0 checks its workers (and a worker its parent)


def _watch_parent() -> None:
    """A worker whose rank 0 vanished (SIGKILL, OOM) exits instead of waiting for commands forever."""
    parent = os.getppid()
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            os._exit(3)


def _worker_main(rank: int, world_size: int, init_method: str, device: str, log_level: int) -> None:
    # Signals go to rank 0, which drains and then sends ("stop",); a Ctrl-C on the terminal must not kill us first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    threading.Thread(target=_watch_parent, name="loramux-parent-watch", daemon=True).start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    tp = init_tensor_parallel(rank, world_size, device, init_method, COLLECTIVE_TIMEOUT_S, CMD_TIMEOUT_S)
    try:
        first = tp.broadcast_object()
        if first[0] == "spec":
            worker_loop(first[1], tp)
    finally:
        destroy_tensor_parallel()
    log.info("rank %d: stopped", rank)


class TPWorkerGroup:
    """Rank 0's handle on the other ranks: start, watch (a dead worker calls on_failure once), stop."""

    def __init__(self, world_size: int, device: torch.device):
        import torch.multiprocessing as mp

        self.world_size, self.failed, self._stopping = world_size, None, False
        if world_size > 1 and device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"--tensor-parallel-size {world_size} needs {world_size} GPUs, "
                             f"{torch.cuda.device_count()} visible")
        init_method = f"tcp://127.0.0.1:{free_port()}"
        dev = "cuda" if device.type == "cuda" else "cpu"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, name=f"loramux-tp{r}", daemon=True,
                                  args=(r, world_size, init_method, dev, logging.getLogger().level))
                      for r in range(1, world_size)]
        for p in self.procs:
            p.start()
        log.info("tensor parallelism %d: worker pids %s", world_size, ", ".join(str(p.pid) for p in self.procs))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        try:
            self.tp: TPState = init_tensor_parallel(0, world_size, dev, init_method, COLLECTIVE_TIMEOUT_S,
                                                    CMD_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def dead_worker(self) -> str | None:
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                return f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def watch(self, on_failure) -> None:
        """Poll the workers' liveness; the first death (unless stopping) is logged and passed to on_failure."""
        def run() -> None:
            while not self._stopping:
                reason = self.dead_worker()
                if reason is not None and not self._stopping:
                    self.failed = reason
                    log.error("%s: the server stops (exit status 1)", reason)
                    on_failure(reason)
                    return
                time.sleep(POLL_S)

        threading.Thread(target=run, name="loramux-tp-watchdog", daemon=True).start()

    def stop(self, timeout: float = 15.0) -> None:
        """After rank 0's engine thread has stopped: send ("stop",), wait for the workers, kill what is left."""
        self._stopping = True
        if self.failed is None and self.dead_worker() is None:
            try:
                stop_workers(self.tp)
            except Exception as exc:  # noqa: BLE001 (a worker died meanwhile: kill the rest below)
                log.warning("tensor-parallel stop: %s", exc)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.kill()
        if self.failed is None:
            destroy_tensor_parallel()

    def kill(self) -> None:
        self._stopping = True
        for p in self.procs:
            if p.is_alive():
                log.warning("killing tensor-parallel worker pid %d", p.pid)
                p.kill()
                p.join(5)
