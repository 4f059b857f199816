"""Normalized decoder config parsed from a Hugging Face config.json (Llama 2/3, Mistral, Qwen2)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ModelLoadError(ValueError):
    """A model folder that cannot be served; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # normalized: {"rope_type": ..., factor, ...} or None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    raw: dict = field(repr=False, compare=False, default_factory=dict)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path}: missing; a model folder needs a Hugging Face config.json")
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{cfg_path}: not valid JSON ({exc})") from exc
        return cls.from_hf(raw, source=str(cfg_path))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(raw.get("model_type", ""))
        if arch is None:
            raise ModelLoadError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if raw.get("auto_map"):
            # Custom code is never executed; the standard architecture is used as declared.
            pass
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kind = SUPPORTED_ARCHITECTURES[arch]
            rope_theta, scaling = _rope(raw)
            window = raw.get("sliding_window") if kind == "mistral" else None
            if kind == "qwen2" and raw.get("use_sliding_window"):
                raise ModelLoadError(f"{source}: Qwen2 use_sliding_window=true is not supported")
            eos = raw.get("eos_token_id")
            return cls(
                architecture=kind,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                qkv_bias=kind == "qwen2" or bool(raw.get("attention_bias", False)),
                o_bias=kind != "qwen2" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                sliding_window=int(window) if window else None,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else [])),
                raw=raw,
            )
        except KeyError as exc:
            raise ModelLoadError(f"{source}: required field {exc.args[0]!r} is missing") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"{source}: invalid value ({exc})") from exc


def _rope(raw: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the transformers<5 (`rope_theta` + `rope_scaling`) or >=5 (`rope_parameters`) form."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "llama3"):
        raise ModelLoadError(f"config.json: rope type {kind!r} is not supported (default, linear, dynamic, llama3)")
    scaling["rope_type"] = kind
    return theta, scaling
