"""BaseModelSpec: the served base model's LoRA-targetable projections (no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTN_MODULES + MLP_MODULES
# Parent block of each projection inside a decoder layer.
BLOCK_OF = {**{m: "self_attn" for m in ATTN_MODULES}, **{m: "mlp" for m in MLP_MODULES}}


def module_path(layer: int, module: str) -> str:
    """PEFT's name for a projection, relative to the *ForCausalLM model: model.layers.0.self_attn.q_proj."""
    return f"model.layers.{layer}.{BLOCK_OF[module]}.{module}"


@dataclass(frozen=True)
class BaseModelSpec:
    num_layers: int
    modules: dict[str, tuple[int, int]] = field(hash=False)  # "q_proj" -> (in_features, out_features)
    max_lora_rank: int = 64
    dtype: str = "float32"
    model_name: str = ""

    @classmethod
    def from_hf_config(cls, cfg: dict, max_lora_rank: int = 64, dtype: str = "float32") -> "BaseModelSpec":
        """Shapes of q,k,v,o,gate,up,down from a Llama/Mistral/Qwen2 config.json dict."""
        try:
            hidden = int(cfg["hidden_size"])
            inter = int(cfg["intermediate_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks a usable {exc} for a Llama-family model") from exc
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)  # Mistral may write head_dim: null
        q, kv = heads * head_dim, kv_heads * head_dim
        modules = {
            "q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        }
        name = str(cfg.get("_name_or_path") or cfg.get("name_or_path") or "")
        return cls(layers, modules, max_lora_rank, dtype, name)
