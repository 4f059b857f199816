"""PEFT-made LoRA adapters for tiny random models (built in-test) and PEFT's own greedy generation."""
from __future__ import annotations

from pathlib import Path

import torch

ADAPTER_VARIANTS = {
    "qv-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
    "mlp-r16-rs": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                     rank_pattern={"o_proj": 4, "layers.1.self_attn.q_proj": 16}, alpha_pattern={"down_proj": 32}),
    "regex-layer1": dict(r=4, lora_alpha=4, target_modules=r".*\.1\.(self_attn|mlp)\.(k|up)_proj"),
    "layers-0": dict(r=8, lora_alpha=32, target_modules=["v_proj", "gate_proj"], layers_to_transform=[0]),
}


def build_peft_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    import peft
    import transformers as tf

    torch.manual_seed(seed)
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # PEFT's non-zero init is small; make each adapter's effect clearly visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    import peft
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=n)
    return out[0, len(prompt):].tolist()


def peft_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    import peft
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()
