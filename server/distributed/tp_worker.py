"""Tensor-parallel engines: the step loop of ranks > 0, rank 0's engine, and an offline launcher over N processes."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig
from loramux.server.runner.model_runner import ModelRunner

from .parallel_state import TPState, destroy_tensor_parallel, init_tensor_parallel
from .tp_lora import TPLoRASlots


@dataclass
class TPEngineSpec:
    """Everything every rank needs to build the same (sharded) model runner; picklable."""

    model_dir: Path
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_model_len: int = 256
    block_size: int = 16
    num_blocks: int = 64
    kernel_backend: str = "auto"
    max_loras: int = 0  # 0: no adapter slots
    max_lora_rank: int = 32
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)
    eos_token_ids: list[int] = field(default_factory=list)


def build_runner(spec: TPEngineSpec, tp: TPState) -> ModelRunner:
    mcfg = ModelConfig.from_dir(spec.model_dir)
    return ModelRunner(spec.model_dir, mcfg, spec.dtype, tp.device, spec.max_model_len, spec.block_size,
                       spec.num_blocks, kernel_backend=spec.kernel_backend, parallel=tp)


def build_driver_engine(spec: TPEngineSpec, tp: TPState, service=None):
    """Rank 0: runner + Engine (scheduler, sampler); with an AdapterService, TP-aware slots and the slot gate.
    The same path as the server's Runtime: runtime.build_engine(parallel=tp) + runtime.attach_adapters."""
    from loramux.server.runtime import attach_adapters, build_engine

    engine = build_engine(spec.model_dir, ModelConfig.from_dir(spec.model_dir), spec.dtype, tp.device,
                          spec.max_model_len, spec.num_blocks, spec.sched, spec.eos_token_ids, spec.block_size,
                          spec.kernel_backend, parallel=tp)
    if service is not None:
        attach_adapters(engine, service)
    return engine


@torch.inference_mode()
def run_replica_step(runner: ModelRunner, host, all_logits: bool) -> None:
    """Ranks > 0: the same forward as rank 0 (its collectives pair with rank 0's); logits are discarded."""
    input_ids, ctx, _ = runner.prepare_host(host)
    hidden = runner.model(input_ids, ctx, runner.kv_caches)
    if all_logits:
        runner.model.compute_logits(hidden)
    elif ctx.logits_indices.numel():
        runner.model.compute_logits(hidden[ctx.logits_indices])


def worker_loop(spec: TPEngineSpec, tp: TPState) -> None:
    """Ranks > 0: execute rank 0's commands ("step", "load", "stop") until told to stop."""
    runner = build_runner(spec, tp)
    if spec.max_loras:
        runner.lora_slots = TPLoRASlots(runner.model, spec.max_loras, spec.max_lora_rank, runner.dtype,
                                        runner.device, None, tp)
    while True:
        cmd = tp.broadcast_object()
        if cmd[0] == "step":
            run_replica_step(runner, cmd[1], cmd[2])
        elif cmd[0] == "load":
            runner.lora_slots.start_load(cmd[1], cmd[2])
        elif cmd[0] == "stop":
            return
        else:
            raise RuntimeError(f"tensor-parallel worker: unknown command {cmd[0]!r}")


def stop_workers(tp: TPState) -> None:
    tp.broadcast_object(("stop",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, init_method: str, spec: TPEngineSpec, driver_fn, result_path: str) -> None:
    import pickle

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    tp = init_tensor_parallel(rank, world_size, spec.device, init_method)
    try:
        if rank == 0:
            try:
                result = driver_fn(spec, tp)
            finally:
                stop_workers(tp)
            with open(result_path, "wb") as f:
                pickle.dump(result, f)
        else:
            worker_loop(spec, tp)
    finally:
        destroy_tensor_parallel()


def launch_offline(world_size: int, spec: TPEngineSpec, driver_fn, workdir: Path):
    """Spawn `world_size` processes (gloo on CPU, NCCL on CUDA); rank 0 calls driver_fn(spec, tp), which builds
    its engine with build_driver_engine and runs it; ranks > 0 run worker_loop. Returns driver_fn's result."""
    import pickle

    import torch.multiprocessing as mp

    result_path = Path(workdir) / f"tp-result-{os.getpid()}-{free_port()}.pkl"
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_entry, args=(world_size, init_method, spec, driver_fn, str(result_path)), nprocs=world_size,
             join=True)
    with open(result_path, "rb") as f:
        return pickle.load(f)
