"""`loramux serve`: command-line flags (each also settable as LORAMUX_<FLAG> in the environment)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from loramux.server.config import ServerConfig, default_cache_dir


def _env(name: str, default):
    """Default for --name from LORAMUX_NAME (dashes -> underscores, upper case)."""
    return os.environ.get("LORAMUX_" + name.upper().replace("-", "_"), default)


def _flag(p: argparse.ArgumentParser, name: str, help: str, default=None, type=str, **kw):
    env_default = _env(name, default)
    if type is not str and isinstance(env_default, str) and env_default != "":
        env_default = type(env_default)
    p.add_argument("--" + name, default=env_default, type=type, help=help + f" [env LORAMUX_{name.upper().replace('-', '_')}]", **kw)


def _bool_env(name: str) -> bool:
    return _env(name, "").lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Multi-adapter LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the HTTP server", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _flag(s, "model", "local Hugging Face model folder (config.json, *.safetensors, tokenizer.json); "
          "omit to serve the embedded tiny demo model", type=Path)
    _flag(s, "served-model-name", "name clients use for the base model (default: the folder name)")
    _flag(s, "host", "address to listen on", "127.0.0.1")
    _flag(s, "port", "TCP port", 8000, int)
    _flag(s, "dtype", "weight/activation dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16",
          "auto")
    _flag(s, "device", "auto (cuda if available), cpu, cuda, cuda:N", "auto")
    _flag(s, "max-model-len", "longest sequence (prompt + output) in tokens; default: the model's "
          "max_position_embeddings, capped by the KV cache", None, int)
    _flag(s, "max-num-seqs", "most sequences in one batch", 64, int)
    _flag(s, "max-num-batched-tokens", "token budget of one engine step; longer prompts are prefilled in chunks",
          2048, int)
    _flag(s, "num-kv-blocks", "KV-cache blocks of 16 tokens (default: sized from memory)", None, int)
    _flag(s, "kv-cache-memory-gb", "KV-cache size on CPU in GiB", 1.0, float)
    _flag(s, "gpu-memory-utilization", "fraction of GPU memory for weights + adapters + KV cache", 0.90, float)
    _flag(s, "cache-dir", "where the demo model and the adapter registry live", default_cache_dir(), Path)
    _flag(s, "adapter-dir", "adapter registry folder (default: CACHE_DIR/adapters)", None, Path)
    s.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="register a PEFT LoRA folder at start (repeatable) [env LORAMUX_ADAPTER, comma-separated]")
    _flag(s, "max-loras", "adapters resident on the device at once (GPU slots)", 8, int)
    _flag(s, "max-lora-rank", "largest accepted LoRA rank", 64, int)
    _flag(s, "max-cpu-loras", "adapters kept in CPU memory (LRU)", 64, int)
    _flag(s, "max-adapter-bytes", "largest accepted adapter_model.safetensors in bytes", 4 << 30, int)
    _flag(s, "kernel-backend", "LoRA kernels: auto (triton on CUDA), triton, torch", "auto",
          choices=["auto", "triton", "torch"])
    s.add_argument("--enforce-eager", action="store_true", default=_bool_env("enforce-eager"),
                   help="run decode steps eagerly instead of replaying CUDA graphs [env LORAMUX_ENFORCE_EAGER]")
    s.add_argument("--no-demo-adapters", action="store_true", default=_bool_env("no-demo-adapters"),
                   help="do not register the demo adapters with the embedded model [env LORAMUX_NO_DEMO_ADAPTERS]")
    _flag(s, "log-level", "debug, info, warning, error", "info")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    raw = args.adapter if args.adapter is not None else [a for a in _env("adapter", "").split(",") if a]
    adapters = []
    for item in raw:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"loramux: error: --adapter expects NAME=PATH, got {item!r}")
        adapters.append((name, Path(path)))
    return ServerConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb, gpu_memory_utilization=args.gpu_memory_utilization,
        cache_dir=args.cache_dir, adapter_dir=args.adapter_dir, adapters=tuple(adapters),
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
        max_adapter_bytes=args.max_adapter_bytes,
        kernel_backend=args.kernel_backend, enforce_eager=args.enforce_eager, demo_adapters=not args.no_demo_adapters, log_level=args.log_level)


def serve(config: ServerConfig) -> int:
    import uvicorn

    from loramux.server.api.app import create_app
    from loramux.server.models.model_config import ModelLoadError
    from loramux.server.runtime import Runtime

    try:
        runtime = Runtime(config)
    except (ModelLoadError, FileNotFoundError) as exc:
        logging.getLogger("loramux").error("%s", exc)
        return 2
    app = create_app(runtime)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, timeout_graceful_shutdown=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(config_from_args(args))
    return 1


if __name__ == "__main__":
    sys.exit(main())
