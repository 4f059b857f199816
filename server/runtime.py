"""Runtime: builds model, tokenizer, engine and async engine from a ServerConfig, and answers model lookups."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from loramux.server.config import ServerConfig
from loramux.server.engine.async_engine import AsyncEngine
from loramux.server.engine.engine import Engine
from loramux.server.engine.scheduler import SchedulerConfig
from loramux.server.models.model_config import ModelConfig, ModelLoadError
from loramux.server.models.tokenizer import Tokenizer
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


def plan_kv_blocks(cfg: ServerConfig, mcfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                   weight_bytes: int) -> int:
    per_block = ModelRunner.kv_bytes_per_block(mcfg, cfg.block_size, dtype)
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = total * cfg.gpu_memory_utilization - (total - free) - weight_bytes
    else:
        budget = cfg.kv_cache_memory_gb * 2**30
    return max(1, int(budget // per_block))


def estimate_weight_bytes(m: ModelConfig, dtype: torch.dtype) -> int:
    h, i, v = m.hidden_size, m.intermediate_size, m.vocab_size
    per_layer = h * (m.q_size + 2 * m.kv_size) + m.q_size * h + 3 * h * i + 2 * h
    params = v * h * (1 if m.tie_word_embeddings else 2) + m.num_layers * per_layer + h
    return params * torch.tensor([], dtype=dtype).element_size()


class Runtime:
    """Everything the HTTP layer needs: tokenizer, async engine, served names, adapter resolution."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.created = int(time.time())
        model_dir = config.model
        if model_dir is None:
            from loramux.server.models.demo import ensure_demo_model

            model_dir = ensure_demo_model(Path(config.cache_dir))
            log.info("no --model given: serving the embedded demo model from %s", model_dir)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelLoadError(f"--model {model_dir}: not a folder")
        self.model_dir = model_dir
        self.model_config = mcfg = ModelConfig.from_dir(model_dir)
        self.model_name = config.served_model_name or model_dir.name
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.vocab_size = mcfg.vocab_size
        num_blocks = plan_kv_blocks(config, mcfg, self.dtype, self.device, estimate_weight_bytes(mcfg, self.dtype))
        max_len = config.max_model_len or mcfg.max_position_embeddings
        if num_blocks * config.block_size < max_len:
            log.warning("KV cache holds %d tokens, less than max_model_len %d; capping max_model_len",
                        num_blocks * config.block_size, max_len)
            max_len = num_blocks * config.block_size
        self.max_model_len = max_len
        self.runner = ModelRunner(model_dir, mcfg, self.dtype, self.device, max_len, config.block_size,
                                  num_blocks, kernel_backend=config.kernel_backend)
        eos = sorted(set(self.tokenizer.eos_token_ids) | set(mcfg.eos_token_ids))
        sched = SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                max_num_batched_tokens=config.max_num_batched_tokens,
                                max_model_len=max_len, max_loras=config.max_loras)
        self.engine = Engine(self.runner, sched, num_blocks, config.block_size, eos)
        self.async_engine = AsyncEngine(self.engine, self.tokenizer)
        self.ready = False
        log.info("serving %s on %s (%s): max_model_len %d, %d KV blocks (%d tokens)", self.model_name,
                 self.device, str(self.dtype).replace("torch.", ""), max_len, num_blocks,
                 num_blocks * config.block_size)

    def resolve_model(self, name: str | None, request=None) -> str | None:
        """The adapter id a request's `model` names: None for the base model."""
        from loramux.server.api.errors import APIError

        if name is None or name == self.model_name:
            return None
        raise APIError(404, f"the model {name!r} does not exist", "model", "model_not_found")
