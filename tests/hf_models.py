"""Tiny random Hugging Face models built in-test (no downloads) for comparisons with transformers."""
from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=512, rms_norm_eps=1e-6)


def build_tiny(kind: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `kind` (llama | mistral | qwen2) model to `out` and return the folder."""
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    kw = dict(TINY, **overrides)
    if kind == "mistral":
        kw.setdefault("sliding_window", 4096)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # HF init is small; widen it so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.shape[0] != kw["hidden_size"]:
                p.normal_(0, 0.05)  # biases
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


def hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
