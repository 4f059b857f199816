"""Tiny model configs and a transformers model builder shared by the adapter tests."""
from __future__ import annotations

# intermediate != hidden and kv_heads != heads, so a swapped or GQA-wrong shape cannot pass by accident.
LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=64)
QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=48, intermediate_size=80,
             num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2, vocab_size=64)


def hf_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    kw = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    cls, ccls = (Qwen2ForCausalLM, Qwen2Config) if cfg["model_type"] == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    return cls(ccls(**kw)).eval()
