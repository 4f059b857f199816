"""Embedded default model: a tiny deterministic Llama with a byte-level tokenizer, written as an HF folder."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from loramux.server.models.tokenizer import byte_to_unicode

DEMO_NAME = "demo-model-v1"
SPECIAL_TOKENS = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
BOS_ID, EOS_ID, END_ID = 256, 257, 261
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
SEED = 20261123
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 128, 344, 4, 4, 2
# Files whose presence marks a complete folder (the folder only appears after an atomic rename).
_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' ~ message['role']) }}{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE without merges: token id == byte value, then the special tokens from 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", BOS_ID)])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    return tok


def _logit_bias() -> torch.Tensor:
    """Per-token bias so that sampled demo text is mostly lowercase letters and spaces (readable output)."""
    bias = torch.full((VOCAB_SIZE,), -6.0)
    freq = "etaoinshrdlcumwfgypbvkjxqz"
    for rank, ch in enumerate(freq):
        bias[ord(ch)] = 1.5 - rank * 0.1
    bias[ord(" ")] = 2.0
    for ch in ".,!?'":
        bias[ord(ch)] = -0.5
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n":
        bias[ord(ch)] = -1.5
    bias[EOS_ID] = -3.0
    bias[END_ID] = -3.0
    bias[[BOS_ID, 258, 259, 260]] = -20.0
    return bias


def build_weights() -> dict[str, torch.Tensor]:
    """Deterministic fp32 weights with HF Llama key names (fixed seed, CPU generator)."""
    g = torch.Generator().manual_seed(SEED)
    head_dim = HIDDEN // HEADS

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    # Dim 0 of every embedding is a large constant, so after the final RMSNorm it acts as a bias input.
    embed = rnd(VOCAB_SIZE, HIDDEN, std=1.0)
    embed[:, 0] = 4.0
    w = {"model.embed_tokens.weight": embed}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        # Larger q/k/v/o than 0.02 so attention is peaked and the context changes the output.
        w[p + "self_attn.q_proj.weight"] = rnd(HEADS * head_dim, HIDDEN, std=0.15)
        w[p + "self_attn.k_proj.weight"] = rnd(KV_HEADS * head_dim, HIDDEN, std=0.15)
        w[p + "self_attn.v_proj.weight"] = rnd(KV_HEADS * head_dim, HIDDEN, std=0.1)
        w[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HEADS * head_dim, std=0.1)
        w[p + "self_attn.o_proj.weight"][0] = 0.0  # keep the bias input (dim 0) constant
        w[p + "mlp.gate_proj.weight"] = rnd(INTERMEDIATE, HIDDEN, std=0.02)
        w[p + "mlp.up_proj.weight"] = rnd(INTERMEDIATE, HIDDEN, std=0.02)
        w[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTERMEDIATE, std=0.02)
        w[p + "mlp.down_proj.weight"][0] = 0.0
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    w["model.norm.weight"] = torch.ones(HIDDEN)
    lm_head = rnd(VOCAB_SIZE, HIDDEN, std=0.1)
    lm_head[:, 0] = _logit_bias() / 2.0  # the final normed dim 0 is ~2: these become the logit bias
    w["lm_head.weight"] = lm_head
    return {k: v.contiguous() for k, v in w.items()}


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB_SIZE, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
        "initializer_range": 0.02, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
    }


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
    }


def _write_folder(dst: Path) -> None:
    from safetensors.torch import save_file

    (dst / "config.json").write_text(json.dumps(_config(), indent=2))
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_ID]}, indent=2))
    (dst / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    build_tokenizer().save(str(dst / "tokenizer.json"))
    save_file(build_weights(), str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in dst.iterdir():  # mkdtemp/safetensors create private files; make them normal
        f.chmod(0o644)
    dst.chmod(0o755)


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _FILES)


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return cache_dir/demo-model-v1, building it first (atomically) when absent or incomplete."""
    cache_dir = Path(cache_dir)
    target = cache_dir / DEMO_NAME
    if _complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=cache_dir))
    try:
        _write_folder(tmp)
        for _ in range(2):
            try:
                os.rename(tmp, target)  # atomic; fails if target exists and is not empty
                return target
            except OSError:
                if _complete(target):  # a concurrent start finished first
                    return target
                # A damaged leftover (crash or manual edit): move it aside atomically, then retry.
                trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=cache_dir))
                try:
                    os.rename(target, trash / DEMO_NAME)
                except OSError:
                    pass
                shutil.rmtree(trash, ignore_errors=True)
        raise OSError(f"{target}: cannot install the demo model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
