"""Named model shapes for benchmarks (random weights, no checkpoint needed): real architectures' dimensions."""
from __future__ import annotations

from .model_config import ModelConfig

SHAPES = {
    # Llama-3-8B / Llama-3.1-8B dimensions
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    # Llama-3.2-1B dimensions (tied embeddings)
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                      tie_word_embeddings=True),
    # a CPU-sized model for engine-overhead runs
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    raw = dict(SHAPES[name], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               eos_token_id=None)
    return ModelConfig.from_hf(raw, source=f"shape {name}")
