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
    max_adapter_bytes: int = 4 << 30  # largest accepted adapter_model.safetensors (uploads and registrations)
    kernel_backend: str = "auto"
    enforce_eager: bool = False  # no CUDA graphs for decode
    demo_adapters: bool = True
    log_level: str = "info"

    @property
    def resolved_adapter_dir(self) -> Path:
        return self.adapter_dir or (self.cache_dir / "adapters")
