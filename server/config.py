"""One frozen settings object for the whole server, built by the CLI (no I/O here)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loramux"


@dataclass(frozen=True)
class ServerConfig:
    model: Path | None = None  # None = the embedded demo model, built under cache_dir
    served_model_name: str | None = None  # defaults to the model folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto = cuda if available, else cpu
    max_model_len: int | None = None  # None = min(config max_position_embeddings, 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = sized from kv_cache_memory_gb (CPU) / gpu_memory_utilization (CUDA)
    kv_cache_memory_gb: float = 1.0
    gpu_memory_utilization: float = 0.90
    cache_dir: Path = field(default_factory=default_cache_dir)
    adapter_dir: Path | None = None  # None = cache_dir / "adapters"
    adapters: tuple[tuple[str, Path], ...] = ()  # --adapter NAME=PATH, registered at start
    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int = 64
    max_cpu_lora_bytes: int = 0  # bytes of adapters in the CPU cache, 0 = bounded by max_cpu_loras only
    max_adapter_wait_steps: int = 32  # fairness bound (scheduler steps), like LoRAX's adapter cycle time
    max_adapter_bytes: int = 4 << 30  # largest accepted adapter_model.safetensors (uploads and registrations)
    kernel_backend: str = "auto"
    tensor_parallel_size: int = 1  # >1: offline engine only so far (server/distributed); serve refuses it
    enforce_eager: bool = False  # no CUDA graphs at all
    mixed_step_graphs: bool = True  # CUDA graphs also for steps with prompt tokens (per token bucket)
    sync_adapter_copies: bool = False  # CPU -> GPU slot copies on the engine thread's stream (default: side stream)
    adapter_load_processes: int = 0  # disk -> CPU loads in this many worker processes; 0 = loader threads
    pin_adapter_cache: bool = False  # page-lock the CPU adapter cache (faster uploads, slow pinning per load)
    max_packed_adapter_bytes: int = -1  # packed forms on disk (cache_dir/packed-adapters); -1 = half the free space
    demo_adapters: bool = True
    log_level: str = "info"
    # ---- tenants and hardening (docs/operations.md) ----
    api_keys: Path | None = None  # JSON/TOML file of keys -> tenant + role; None = open single-tenant mode
    public_metrics: bool = False  # with api_keys: /metrics without a key (else it needs an admin key)
    max_n: int = 16  # choices per request
    max_logprobs: int = 20  # logprobs / top_logprobs alternatives
    max_stop: int = 16  # stop strings (and stop_token_ids) per request
    max_stop_length: int = 256  # characters of one stop string
    max_body_bytes: int = 8 << 20  # JSON request bodies (uploads: max_adapter_bytes + 16 MiB)
    max_header_bytes: int = 16 << 10  # request line + headers (h11), over it: 431
    max_connections: int = 1024  # open connections + tasks before uvicorn answers 503 itself
    max_queued_requests: int = 512  # sequences admitted beyond max_num_seqs before new requests get 503
    max_concurrent_uploads: int = 2  # adapter uploads at once (each holds up to max_adapter_bytes)
    rate_limit_requests_per_s: float = 0.0  # per tenant, 0 = unlimited (per-tenant overrides: the keys file)
    rate_limit_tokens_per_s: float = 0.0  # prompt + completion tokens per tenant per second, 0 = unlimited
    rate_limit_burst_s: float = 10.0  # a bucket holds this many seconds of its rate
    drain_timeout: float = 30.0  # SIGTERM/SIGINT: seconds running requests get before they are aborted

    @property
    def resolved_adapter_dir(self) -> Path:
        return self.adapter_dir or (self.cache_dir / "adapters")
