"""`loramux serve`: command-line flags (each also settable as LORAMUX_<FLAG> in the environment)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path

from loramux.server.config import ServerConfig, default_cache_dir


def _env(name: str, default):
    """Default for --name from LORAMUX_NAME (dashes -> underscores, upper case); an empty value counts as unset,
    as compose files and Kubernetes manifests often leave them."""
    value = os.environ.get("LORAMUX_" + name.upper().replace("-", "_"), "")
    return default if value == "" else value


def _flag(p: argparse.ArgumentParser, name: str, help: str, default=None, type=str, **kw):
    env_default = _env(name, default)
    if type is not str and isinstance(env_default, str) and env_default != "":
        env_default = type(env_default)
    p.add_argument("--" + name, default=env_default, type=type, help=help + f" [env LORAMUX_{name.upper().replace('-', '_')}]", **kw)


def _bool_env(name: str, default: bool = False) -> bool:
    return _env(name, "1" if default else "").lower() in ("1", "true", "yes", "on")


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
    _flag(s, "max-cpu-lora-bytes", "bytes of adapters kept in CPU memory (LRU), 0 = no byte limit", 0, int)
    _flag(s, "max-adapter-wait-steps", "fairness bound: steps a request may be passed over for its adapter before "
          "it goes first and running adapters are drained for it", 32, int)
    _flag(s, "max-adapter-bytes", "largest accepted adapter_model.safetensors in bytes", 4 << 30, int)
    _flag(s, "kernel-backend", "LoRA kernels: auto (triton on CUDA), triton, torch", "auto",
          choices=["auto", "triton", "torch"])
    _flag(s, "tensor-parallel-size", "GPUs (processes) one model is sharded across: rank 0 serves HTTP, N-1 "
          "worker processes hold the other shards (NCCL on CUDA, gloo on CPU)", 1, int)
    s.add_argument("--enforce-eager", action="store_true", default=_bool_env("enforce-eager"),
                   help="run every step eagerly instead of replaying CUDA graphs [env LORAMUX_ENFORCE_EAGER]")
    s.add_argument("--mixed-step-graphs", action=argparse.BooleanOptionalAction,
                   default=_bool_env("mixed-step-graphs", True),
                   help="also capture CUDA graphs for steps with prompt tokens, per token bucket up to "
                        "--max-num-batched-tokens (--no-mixed-step-graphs: such steps run eagerly) "
                        "[env LORAMUX_MIXED_STEP_GRAPHS]")
    s.add_argument("--sync-adapter-copies", action="store_true", default=_bool_env("sync-adapter-copies"),
                   help="copy adapters into GPU slots synchronously on the engine thread instead of on a side CUDA "
                        "stream overlapped with decoding [env LORAMUX_SYNC_ADAPTER_COPIES]")
    _flag(s, "adapter-load-processes", "worker processes that load adapters from disk (off the server's GIL); "
          "0 = threads of the server process (default: faster on the H100 host, docs/performance.md)", 0, int)
    s.add_argument("--pin-adapter-cache", action="store_true", default=_bool_env("pin-adapter-cache"),
                   help="page-lock adapters held in CPU memory (faster GPU uploads, but pinning each load is slow "
                        "on some hosts) [env LORAMUX_PIN_ADAPTER_CACHE]")
    _flag(s, "max-packed-adapter-bytes", "disk bytes for the packed (slot-ready) form of loaded adapter versions "
          "under CACHE_DIR/packed-adapters, so a reload maps one file instead of reading and converting the folder;"
          " -1 = half the free space at start, 0 = off", -1, int)
    s.add_argument("--no-demo-adapters", action="store_true", default=_bool_env("no-demo-adapters"),
                   help="do not register the demo adapters with the embedded model [env LORAMUX_NO_DEMO_ADAPTERS]")
    _flag(s, "log-level", "debug, info, warning, error", "info")
    h = s.add_argument_group("tenants, limits and shutdown (see docs/operations.md)")
    _flag(h, "api-keys", "JSON or TOML file: API key (or sha256:HEX) -> tenant and role user|admin; without it the "
          "server runs open, single-tenant", type=Path)
    h.add_argument("--public-metrics", action="store_true", default=_bool_env("public-metrics"),
                   help="with --api-keys, serve /metrics without a key (else it needs an admin key) "
                        "[env LORAMUX_PUBLIC_METRICS]")
    _flag(h, "max-n", "most choices (n) per request", 16, int)
    _flag(h, "max-logprobs", "most logprobs / top_logprobs alternatives", 20, int)
    _flag(h, "max-stop", "most stop strings (and stop_token_ids) per request", 16, int)
    _flag(h, "max-stop-length", "longest stop string in characters", 256, int)
    _flag(h, "max-body-bytes", "largest JSON request body (adapter uploads: --max-adapter-bytes + 16 MiB)",
          8 << 20, int)
    _flag(h, "max-header-bytes", "largest request line + headers; over it the answer is 431", 16 << 10, int)
    _flag(h, "max-connections", "open connections before new ones get 503 (0: no limit)", 1024, int)
    _flag(h, "max-queued-requests", "sequences admitted beyond --max-num-seqs before new requests get 503", 512, int)
    _flag(h, "max-concurrent-uploads", "adapter uploads at once; more get 503", 2, int)
    _flag(h, "rate-limit-requests-per-s", "requests per second per tenant, 0 = unlimited (429 over it)", 0.0, float)
    _flag(h, "rate-limit-tokens-per-s", "prompt + completion tokens per second per tenant, 0 = unlimited", 0.0, float)
    _flag(h, "rate-limit-burst-s", "a tenant's bucket holds this many seconds of its rate", 10.0, float)
    _flag(h, "drain-timeout", "on SIGTERM/SIGINT, seconds running requests get to finish before they are aborted",
          30.0, float)
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
        max_cpu_lora_bytes=args.max_cpu_lora_bytes, max_adapter_wait_steps=args.max_adapter_wait_steps,
        max_adapter_bytes=args.max_adapter_bytes,
        kernel_backend=args.kernel_backend, tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager, mixed_step_graphs=args.mixed_step_graphs,
        sync_adapter_copies=args.sync_adapter_copies, demo_adapters=not args.no_demo_adapters,
        adapter_load_processes=args.adapter_load_processes, pin_adapter_cache=args.pin_adapter_cache,
        max_packed_adapter_bytes=args.max_packed_adapter_bytes,
        log_level=args.log_level, api_keys=args.api_keys, public_metrics=args.public_metrics, max_n=args.max_n,
        max_logprobs=args.max_logprobs, max_stop=args.max_stop, max_stop_length=args.max_stop_length,
        max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
        max_connections=args.max_connections, max_queued_requests=args.max_queued_requests,
        max_concurrent_uploads=args.max_concurrent_uploads, rate_limit_requests_per_s=args.rate_limit_requests_per_s,
        rate_limit_tokens_per_s=args.rate_limit_tokens_per_s, rate_limit_burst_s=args.rate_limit_burst_s,
        drain_timeout=args.drain_timeout)


def _check_switches() -> None:
    """The on/off/auto environment switches read deep in the engine, checked before the model loads: a typo is a
    one-line error and exit 2, not a traceback minutes later."""
    from loramux.server.models.model_config import ModelLoadError

    try:  # the LoRA kernels' settings are read when they are imported
        importlib.import_module("loramux.kernels.lora_meta")
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    from loramux.kernels.backend import env_mode
    from loramux.server.engine.engine import ASYNC_DECODE_ENV
    from loramux.server.engine.sampler import FUSED_SAMPLING_ENV

    for name in (ASYNC_DECODE_ENV, FUSED_SAMPLING_ENV):
        try:
            env_mode(name)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain (docs/operations.md); 0 after a clean shutdown, 2 on a bad setup."""
    from loramux.server.api.app import create_app
    from loramux.server.api.auth import KeyFileError, KeyStore
    from loramux.server.api.serving import build_server
    from loramux.server.models.model_config import ModelLoadError

    log = logging.getLogger("loramux")
    # Loading a large model takes a while: a SIGTERM then (e.g. a pod deleted during start-up) exits at once
    # instead of waiting out the grace period. The HTTP server installs its draining handler when it starts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    group = None
    try:
        try:
            _check_switches()
            from loramux.server.runtime import Runtime  # after the check: importing the kernels reads switches

            keys = KeyStore.from_file(config.api_keys) if config.api_keys is not None else None
            if config.tensor_parallel_size < 1:
                raise ModelLoadError("--tensor-parallel-size must be at least 1")
            if config.tensor_parallel_size > 1:
                from loramux.server.distributed.tp_serve import TPWorkerGroup
                from loramux.server.runtime import resolve_device

                try:
                    group = TPWorkerGroup(config.tensor_parallel_size, resolve_device(config.device))
                except ValueError as exc:
                    raise ModelLoadError(str(exc)) from exc
            runtime = Runtime(config, parallel=None if group is None else group.tp)
        except (KeyFileError, ModelLoadError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 2
        server = build_server(create_app(runtime, keys=keys), config)
        if group is not None:
            group.watch(lambda reason: _tp_failure(runtime, server, reason))
        server.run()
        if getattr(runtime.adapters, "close", None) is not None:
            runtime.adapters.close()
        return 1 if group is not None and group.failed else 0
    finally:
        if group is not None:
            group.stop()


def _tp_failure(runtime, server, reason: str) -> None:
    """A tensor-parallel worker died: /health and /ready answer 503 and open requests fail at once; a second
    later (probes and clients see the 503) the server shuts down and exits 1, or is cut short after 20 s more
    if rank 0 is stuck in a collective that will never complete."""
    import threading
    import time

    runtime.async_engine.fail(RuntimeError(reason))

    def stop() -> None:
        time.sleep(1.0)
        server.should_exit = True
        time.sleep(20.0)
        logging.getLogger("loramux").error("still running 20 s after a worker died: exiting now")
        os._exit(1)

    threading.Thread(target=stop, name="loramux-tp-stop", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(config_from_args(args))
    return 1


if __name__ == "__main__":
    sys.exit(main())
