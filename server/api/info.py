"""GET /health (liveness), /ready (model and preloaded adapters ready), /info (model, limits, version)."""
from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter, Request

from .errors import error_response

router = APIRouter()

# HF config.json names -> attributes of the runtime's parsed ModelConfig.
_MODEL_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                 "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
                 "num_hidden_layers": "num_layers", "vocab_size": "vocab_size",
                 "max_position_embeddings": "max_position_embeddings"}


_LIMITS = ("max_n", "max_logprobs", "max_stop", "max_stop_length", "max_body_bytes", "max_header_bytes",
           "max_queued_requests", "max_concurrent_uploads", "rate_limit_requests_per_s", "rate_limit_tokens_per_s",
           "rate_limit_burst_s", "drain_timeout")


def version() -> str:
    try:
        return metadata.version("loramux")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@router.get("/health")
async def health(request: Request):
    if request.app.state.runtime.async_engine.dead is not None:
        return error_response(503, "the engine has stopped")
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    rt = request.app.state.runtime
    if rt.async_engine.dead is not None:
        return error_response(503, "the engine has stopped")
    if getattr(rt, "draining", False):
        return error_response(503, "the server is shutting down", None, "server_draining", {"Retry-After": "1"})
    if not getattr(rt, "ready", False):
        return error_response(503, "the model is not loaded yet")
    return {"status": "ready", "model": rt.model_name}


@router.get("/info")
async def info(request: Request):
    rt = request.app.state.runtime
    cfg, mcfg = rt.config, rt.model_config
    return {
        "model": rt.model_name,
        "architecture": mcfg.architecture,
        "model_config": {name: getattr(mcfg, attr) for name, attr in _MODEL_FIELDS.items()},
        "max_model_len": rt.max_model_len,
        "dtype": str(rt.dtype).replace("torch.", ""),
        "device": str(rt.device),
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "block_size": cfg.block_size,
        "max_loras": cfg.max_loras,
        "max_lora_rank": cfg.max_lora_rank,
        "max_cpu_loras": cfg.max_cpu_loras,
        "max_adapter_bytes": getattr(cfg, "max_adapter_bytes", None),
        "tenancy": "api-keys" if getattr(request.app.state, "keys", None) is not None else "open",
        "limits": {name: getattr(cfg, name, None) for name in _LIMITS},
        "version": version(),
    }
