"""make-adapters: random PEFT LoRA adapters shaped for the served base model (from /info), uploaded over REST."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .safetensors_io import BF16Array, save_file

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads")


class ModelInfoError(ValueError):
    """/info did not describe the base model well enough to shape adapters."""


def extract_model_config(info: Any) -> dict[str, Any]:
    """The HF-style config inside a /info document: info['model_config'] (or 'config' / 'hf_config', or
    info itself), descending into 'text_config' for multimodal configs."""
    if not isinstance(info, dict):
        raise ModelInfoError(f"/info did not return a JSON object: {str(info)[:200]}")
    candidates = [info[k] for k in ("model_config", "config", "hf_config") if isinstance(info.get(k), dict)]
    candidates.append(info)
    for cfg in candidates:
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]
        if "hidden_size" in cfg:
            missing = [k for k in REQUIRED if not isinstance(cfg.get(k), int)]
            if missing:
                raise ModelInfoError(f"/info model_config lacks integer field(s) {missing}; has {sorted(cfg)}")
            return cfg
    raise ModelInfoError(
        "/info has no model_config with hidden_size, num_hidden_layers, num_attention_heads "
        f"(top-level keys: {sorted(info)}); the server must expose the base model's HF config there"
    )


def module_shapes(cfg: dict[str, Any], targets: list[str]) -> dict[str, tuple[str, int, int]]:
    """target -> (submodule path under a layer, in_features, out_features) for Llama/Mistral/Qwen2 layouts."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    inter = cfg.get("intermediate_size")
    shapes = {
        "q_proj": ("self_attn.q_proj", h, nh * hd),
        "k_proj": ("self_attn.k_proj", h, nkv * hd),
        "v_proj": ("self_attn.v_proj", h, nkv * hd),
        "o_proj": ("self_attn.o_proj", nh * hd, h),
    }
    if isinstance(inter, int):
        shapes.update(
            gate_proj=("mlp.gate_proj", h, inter),
            up_proj=("mlp.up_proj", h, inter),
            down_proj=("mlp.down_proj", inter, h),
        )
    out = {}
    for t in targets:
        if t not in ATTN + MLP:
            raise ValueError(f"unknown target module {t!r}; choose from {', '.join(ATTN + MLP)}")
        if t not in shapes:
            raise ModelInfoError(f"target {t} needs intermediate_size, which /info model_config lacks")
        out[t] = shapes[t]
    return out


def _cast(a: np.ndarray, dtype: str):
    if dtype == "bfloat16":
        return BF16Array(a)
    return a.astype({"float16": np.float16, "float32": np.float32}[dtype])


def build_adapter(
    rng: np.random.Generator,
    cfg: dict[str, Any],
    targets: list[str],
    rank: int,
    alpha: float,
    base_model: str,
    dtype: str = "float16",
    init_scale: float = 0.01,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config.json dict, tensors) for one random LoRA on every layer: A ~ N(0, 1/in), B ~ N(0, s^2)."""
    tensors: dict[str, Any] = {}
    for _, (sub, fin, fout) in module_shapes(cfg, targets).items():
        for layer in range(cfg["num_hidden_layers"]):
            key = f"base_model.model.model.layers.{layer}.{sub}"
            a = rng.standard_normal((rank, fin), dtype=np.float32) / np.float32(np.sqrt(fin))
            b = rng.standard_normal((fout, rank), dtype=np.float32) * np.float32(init_scale)
            tensors[f"{key}.lora_A.weight"] = _cast(a, dtype)
            tensors[f"{key}.lora_B.weight"] = _cast(b, dtype)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return config, tensors


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, Any]) -> int:
    """Write adapter_config.json and adapter_model.safetensors; returns the weights' size in bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


def upload_adapter(client: httpx.Client, base_url: str, adapter_id: str, directory: Path, replace: bool = False):
    """POST /v1/adapters (multipart: adapter_config.json, adapter_model.safetensors, form field id);
    with replace, a 409 is answered by DELETE /v1/adapters/{id} and one more POST. Returns the response."""
    url = base_url.rstrip("/") + "/v1/adapters"

    def post() -> httpx.Response:
        files = {
            name: (name, (directory / name).read_bytes(), mime)
            for name, mime in (("adapter_config.json", "application/json"),
                               ("adapter_model.safetensors", "application/octet-stream"))
        }
        return client.post(url, data={"id": adapter_id}, files=files)

    resp = post()
    if resp.status_code == 409 and replace:
        client.delete(f"{url}/{adapter_id}")
        resp = post()
    return resp


def fetch_info(client: httpx.Client, base_url: str) -> tuple[dict[str, Any], Any]:
    """(model config, raw /info document); ModelInfoError with the reason when it cannot be had."""
    try:
        resp = client.get(base_url.rstrip("/") + "/info")
    except httpx.HTTPError as e:
        raise ModelInfoError(f"GET /info failed: {type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        raise ModelInfoError(f"GET /info returned {resp.status_code}: {resp.text[:200]}")
    try:
        info = resp.json()
    except ValueError:
        raise ModelInfoError(f"GET /info did not return JSON: {resp.text[:200]}") from None
    return extract_model_config(info), info


def base_model_name(info: Any, cfg: dict[str, Any]) -> str | None:
    for d in (info if isinstance(info, dict) else {}, cfg):
        for k in ("model_id", "model", "model_name", "base_model", "_name_or_path", "name"):
            if isinstance(d.get(k), str) and d[k]:
                return d[k]
    return None


def make_adapters(args) -> int:
    """The make-adapters command; returns the exit status (1 if any upload failed)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not ranks or min(ranks) <= 0 or not targets or args.count <= 0:
        raise SystemExit("error: need --count >= 1, positive --ranks and at least one --targets module")
    out_dir = Path(args.out_dir)
    with httpx.Client(headers=headers, timeout=args.timeout, trust_env=False) as client:
        try:
            cfg, info = fetch_info(client, args.base_url)
            module_shapes(cfg, targets)
        except ModelInfoError as e:
            raise SystemExit(f"error: {e}") from None
        base = args.base_model or base_model_name(info, cfg) or "unknown"
        print(f"base model {base}: hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, "
              f"heads {cfg['num_attention_heads']}/{cfg.get('num_key_value_heads') or cfg['num_attention_heads']}")
        rng = np.random.default_rng(args.seed)
        failures = 0
        for i in range(args.count):
            adapter_id = f"{args.prefix}{i}"
            rank = ranks[i % len(ranks)]
            alpha = args.alpha if args.alpha is not None else float(rank)
            config, tensors = build_adapter(rng, cfg, targets, rank, alpha, base, args.dtype, args.init_scale)
            size = write_adapter(out_dir / adapter_id, config, tensors)
            status = "written"
            if not args.no_upload:
                try:
                    resp = upload_adapter(client, args.base_url, adapter_id, out_dir / adapter_id, args.replace)
                    status = f"HTTP {resp.status_code}"
                    if resp.status_code >= 300:
                        failures += 1
                        status += f" {resp.text[:200]}"
                except httpx.HTTPError as e:
                    failures += 1
                    status = f"{type(e).__name__}: {e}"
            print(f"{adapter_id}: r={rank} alpha={alpha:g} {size / 1e6:.2f} MB -> {status}")
    print(f"adapters written under {out_dir}" + (f"; {failures} upload(s) failed" if failures else ""))
    return 1 if failures else 0
