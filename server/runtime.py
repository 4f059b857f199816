"""Runtime: builds model, tokenizer, engine and async engine from a ServerConfig, and answers model lookups."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from loramux.adapters.errors import AdapterError
from loramux.server.adapter_service import AdapterService
from loramux.server.config import ServerConfig
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.engine import Engine
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig, ModelLoadError
from loramux.server.models.tokenizer import Tokenizer
from loramux.server.runner.lora_slots import LoRASlots
from loramux.server.runner.model_runner import ModelRunner

log = logging.getLogger("loramux")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"--dtype {name!r} is not one of auto, float32, float16, bfloat16")
    return _DTYPES[name]


def check_load_processes(n: int) -> int:
    if n < 0:
        raise ModelLoadError("--adapter-load-processes must be 0 (loader threads) or a positive count")
    return n


def lora_slot_bytes(m: ModelConfig, slots: int, max_rank: int, dtype: torch.dtype) -> int:
    """Device bytes of the stacked LoRA buffers (A [S, L*R, K] + B [S, N, R] per packed linear and layer)."""
    h, i, q, kv = m.hidden_size, m.intermediate_size, m.q_size, m.kv_size
    per_layer = (3 * h + (q + 2 * kv)) + (q + h) + (2 * h + 2 * i) + (i + h)  # (L*K + N) summed over 4 groups
    return slots * max_rank * per_layer * m.num_layers * torch.tensor([], dtype=dtype).element_size()


def plan_kv_blocks(cfg: ServerConfig, mcfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                   weight_bytes: int) -> int:
    """KV blocks for what is left of the memory budget after the weights and the LoRA slots."""
    per_block = ModelRunner.kv_bytes_per_block(mcfg, cfg.block_size, dtype)
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        slots = lora_slot_bytes(mcfg, cfg.max_loras, cfg.max_lora_rank, dtype)
        budget = total * cfg.gpu_memory_utilization - (total - free) - weight_bytes - slots
    else:
        budget = cfg.kv_cache_memory_gb * 2**30
    return max(1, int(budget // per_block))


def estimate_weight_bytes(m: ModelConfig, dtype: torch.dtype) -> int:
    h, i, v = m.hidden_size, m.intermediate_size, m.vocab_size
    per_layer = h * (m.q_size + 2 * m.kv_size) + m.q_size * h + 3 * h * i + 2 * h
    params = v * h * (1 if m.tie_word_embeddings else 2) + m.num_layers * per_layer + h
    return params * torch.tensor([], dtype=dtype).element_size()


def build_engine(model_dir: Path | None, mcfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 num_blocks: int, sched: SchedulerConfig, eos_token_ids: list[int], block_size: int = 16,
                 kernel_backend: str = "auto", gate=None, lora_slots=None, parallel=None) -> Engine:
    """Model runner + engine, without tokenizer or HTTP (also used by tests and offline benchmarks).
    parallel: rank 0's distributed.parallel_state.TPState under tensor parallelism (see distributed.tp_worker)."""
    runner = ModelRunner(model_dir, mcfg, dtype, device, max_model_len, block_size, num_blocks,
                         lora_slots=lora_slots, kernel_backend=kernel_backend, parallel=parallel)
    return Engine(runner, sched, num_blocks, block_size, eos_token_ids, gate)


def attach_adapters(engine: Engine, service: AdapterService, async_copies: bool | None = None) -> None:
    """Give the engine GPU adapter slots managed by `service` (which also becomes the scheduler's gate).
    async_copies: CPU -> GPU slot copies on a side stream (default: on CUDA)."""
    runner = engine.runner
    if async_copies is None:
        async_copies = runner.device.type == "cuda"
    # Background disk -> CPU loads hand the GIL back and forth with the busy engine thread at every tensor call;
    # the default 5 ms switch interval made each hand-back cost up to 5 ms on the H100 host.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
    if runner.parallel is not None:  # tensor parallelism: rank 0's slot loads are mirrored to the other ranks
        from loramux.server.distributed.tp_lora import TPLoRASlots

        service.device_slots = TPLoRASlots(runner.model, service.table.num_slots, service.spec.max_lora_rank,
                                           runner.dtype, runner.device, service.table, runner.parallel)
        runner.lora_slots = service.device_slots
        engine.scheduler.gate = service
        return
    service.device_slots = LoRASlots(runner.model, service.table.num_slots, service.spec.max_lora_rank,
                                     runner.dtype, runner.device, service.table, async_copies=async_copies)
    runner.lora_slots = service.device_slots
    engine.scheduler.gate = service


class Runtime:
    """Everything the HTTP layer needs: tokenizer, async engine, served names, adapter resolution."""

    def __init__(self, config: ServerConfig, parallel=None):
        """parallel: rank 0's TPState under tensor parallelism (distributed.tp_serve starts the other ranks)."""
        self.config, self.parallel = config, parallel
        self.created = int(time.time())
        from loramux.server.models.demo import ensure_demo_model

        spec = str(config.model) if config.model is not None else None
        if spec is None:
            model_dir = ensure_demo_model(Path(config.cache_dir))
            log.info("no --model given: serving the embedded demo model from %s", model_dir)
            mcfg, weights_dir, default_name = ModelConfig.from_dir(model_dir), model_dir, model_dir.name
        elif spec.startswith("random:"):  # a named shape with random weights (benchmarks and load tests)
            from loramux.server.models.shapes import shape_config

            try:
                mcfg = shape_config(spec.split(":", 1)[1])
            except ValueError as exc:
                raise ModelLoadError(f"--model {spec}: {exc}") from exc
            model_dir, weights_dir, default_name = ensure_demo_model(Path(config.cache_dir)), None, spec.replace(":", "-")
            log.info("serving random weights of shape %s with the embedded byte-level tokenizer (sampling limited "
                     "to its vocabulary so every token is text)", spec)
        else:
            model_dir = Path(spec)
            if not model_dir.is_dir():
                raise ModelLoadError(f"--model {model_dir}: not a folder")
            mcfg, weights_dir, default_name = ModelConfig.from_dir(model_dir), model_dir, model_dir.name
        self.model_dir = model_dir  # tokenizer folder (and weights unless random)
        self.model_config = mcfg
        self.model_name = config.served_model_name or default_name
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.vocab_size = mcfg.vocab_size
        max_len = config.max_model_len or mcfg.max_position_embeddings
        num_blocks = plan_kv_blocks(config, mcfg, self.dtype, self.device, estimate_weight_bytes(mcfg, self.dtype))
        # More blocks than max_num_seqs full-length sequences can use is wasted memory.
        num_blocks = min(num_blocks, config.max_num_seqs * -(-max_len // config.block_size))
        if num_blocks * config.block_size < max_len:
            log.warning("KV cache holds %d tokens, less than max_model_len %d; capping max_model_len",
                        num_blocks * config.block_size, max_len)
            max_len = num_blocks * config.block_size
        self.max_model_len = max_len
        eos = sorted(set(self.tokenizer.eos_token_ids) | set(mcfg.eos_token_ids))
        sched = SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_model_len=max_len, max_loras=config.max_loras,
                                max_adapter_wait_steps=config.max_adapter_wait_steps)
        if parallel is not None:
            self.device = parallel.device
            self._start_tp_workers(weights_dir, max_len, num_blocks, sched, eos)
        self.engine = build_engine(weights_dir, mcfg, self.dtype, self.device, max_len, num_blocks, sched, eos,
                                   config.block_size, config.kernel_backend, parallel=parallel)
        if weights_dir is None:  # random weights: sample only ids the byte-level tokenizer can turn into text
            from loramux.server.engine.sampler import Sampler

            self.engine.runner.sampler = Sampler(min(self.tokenizer.vocab_size, mcfg.vocab_size))
        if config.max_loras < 1:
            raise ModelLoadError("--max-loras must be at least 1")
        if config.max_adapter_wait_steps < 0 or config.max_cpu_lora_bytes < 0:
            raise ModelLoadError("--max-adapter-wait-steps and --max-cpu-lora-bytes must not be negative")
        self.adapters = AdapterService(config.resolved_adapter_dir, mcfg.raw, self.dtype, config.max_loras,
                                       config.max_lora_rank, config.max_cpu_loras, config.max_adapter_bytes,
                                       config.max_cpu_lora_bytes or None,
                                       load_processes=check_load_processes(config.adapter_load_processes),
                                       pin_cache=config.pin_adapter_cache,
                                       packed_dir=Path(config.cache_dir) / "packed-adapters",
                                       max_packed_bytes=config.max_packed_adapter_bytes)
        attach_adapters(self.engine, self.adapters, not config.sync_adapter_copies and self.device.type == "cuda")
        log.info("adapters: %d GPU slots of rank <= %d (%.1f MiB), registry %s", config.max_loras,
                 config.max_lora_rank, self.adapters.device_slots.nbytes / 2**20, config.resolved_adapter_dir)
        from loramux.kernels import lora as lora_ops

        log.info("LoRA kernels: %s; CUDA + Triton paths (env LORAMUX_LORA_OVERLAP / _FUSED_LORA_MLP / "
                 "_FUSED_LORA_QKV=0 turns one off): shrink overlap %s, fused MLP expand %s, fused QKV expand %s",
                 self.engine.runner.kernel_backend,
                 *("on" if f else "off" for f in (lora_ops.OVERLAP, lora_ops.FUSED_MLP, lora_ops.FUSED_QKV)))
        sampler = getattr(self.engine.runner, "sampler", None)
        fused = sampler is not None and sampler.fused_on(self.device.type == "cuda")
        log.info("decode steps launched ahead: %s (env LORAMUX_ASYNC_DECODE); fused sampling: %s "
                 "(env LORAMUX_FUSED_SAMPLING)", *("on" if f else "off" for f in (self.engine.async_decode, fused)))
        self._register_startup_adapters(config)
        if self.device.type == "cuda" and not config.enforce_eager and parallel is None:
            self.engine.runner.enable_cuda_graphs(config.max_num_seqs,
                                                  config.max_num_batched_tokens if config.mixed_step_graphs else 0)
        if self.device.type == "cuda" and parallel is None:  # CPU has nothing to compile; TP would need the workers
            from loramux.server.runner.warm_up import warm_up

            warm_up(self.engine.runner, config.max_num_batched_tokens)
        self.async_engine = AsyncEngine(self.engine, self.tokenizer)
        self.ready = False
        self.draining = False  # set by a graceful shutdown: /ready and new requests answer 503
        log.info("serving %s on %s (%s): max_model_len %d, %d KV blocks (%d tokens)", self.model_name,
                 self.device, str(self.dtype).replace("torch.", ""), max_len, num_blocks,
                 num_blocks * config.block_size)

    def _start_tp_workers(self, weights_dir, max_len, num_blocks, sched, eos) -> None:
        """Send the other ranks what they need to build their shards (the same as rank 0's engine)."""
        from loramux.server.distributed.tp_worker import TPEngineSpec

        if weights_dir is None:
            raise ModelLoadError("--tensor-parallel-size > 1 needs a model folder (random weights are per rank)")
        c = self.config
        spec = TPEngineSpec(weights_dir, self.dtype, str(self.device), max_len, c.block_size, num_blocks,
                            c.kernel_backend, c.max_loras, c.max_lora_rank, sched, eos)
        self.parallel.broadcast_object(("spec", spec))

    def _register_startup_adapters(self, config: ServerConfig) -> None:
        for name, path in config.adapters:
            try:
                self.adapters.register_dir(name, path)
            except AdapterError as exc:
                raise ModelLoadError(f"--adapter {name}={path}: {exc}") from exc
            log.info("registered adapter %s from %s", name, path)
        if config.model is None and config.demo_adapters:
            from loramux.adapters.demo import write_demo_adapters

            for name, path in write_demo_adapters(Path(config.cache_dir) / "demo-adapters", self.model_dir).items():
                if self.adapters.registry.get(name) is None:
                    self.adapters.register_dir(name, path, overwrite=False)
            log.info("demo adapters: %s", ", ".join(sorted(a["id"] for a in self.adapters.list())))

    def resolve_model(self, name: str | None, request=None) -> str | None:
        """The adapter key a request's `model` names for its caller (None for the base model). When the request
        carries an admission ticket, the adapter's version is held until the ticket is released."""
        from loramux.server.api.errors import APIError

        if name is None or name == self.model_name:
            return None
        state = getattr(request, "state", None)
        tenant = getattr(state, "tenant", None)
        admin = getattr(state, "role", "admin" if tenant is None else "user") == "admin"
        ticket = getattr(state, "ticket", None)
        try:
            key = self.adapters.resolve(name, tenant, admin, hold=ticket is not None)
        except AdapterError as exc:
            raise APIError(exc.status, exc.message, "model", "model_not_found") from exc
        if ticket is not None:
            ticket.on_release(lambda: self.adapters.unhold(key))
        return key
