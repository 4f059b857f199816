"""Check PEFT LoRA tensor keys, pairs, shapes and ranks against the base model, then cast the weights."""
from __future__ import annotations

import re

import torch

from .config import LoraConfig
from .errors import AdapterError, unsupported
from .spec import BLOCK_OF, MODULES, BaseModelSpec, module_path

# PEFT strips the adapter name on save; a raw state_dict keeps ".default", so both are accepted.
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d{1,6})\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)"
                  r"\.lora_([AB])(?:\.default)?\.weight")
_SCHEME = ("base_model.model.model.layers.<i>.<self_attn|mlp>.<q|k|v|o|gate|up|down>_proj"
           ".lora_A|lora_B.weight")

Pair = tuple[str, str]  # (lora_A key, lora_B key)


def parse_key(key: str) -> tuple[int, str, str]:
    """'base_model.model.model.layers.3.mlp.up_proj.lora_B.weight' -> (3, 'up_proj', 'B')."""
    m = _KEY.fullmatch(key)
    if m is None:
        if "lora_magnitude_vector" in key:
            raise unsupported(f"tensor {key!r} is a DoRA magnitude vector; DoRA adapters are not supported", key)
        if any(s in key for s in ("embed_tokens", "lm_head", "lora_embedding")):
            raise unsupported(f"tensor {key!r} adapts the embeddings or lm_head, which is not supported", key)
        if key.endswith(".bias"):
            raise unsupported(f"tensor {key!r} is a bias; adapters with trained biases are not supported", key)
        raise AdapterError(f"tensor {key!r} is not in PEFT's LoRA naming scheme ({_SCHEME})", key)
    layer_s, block, module, ab = m.groups()
    if layer_s != str(int(layer_s)):
        raise AdapterError(f"tensor {key!r} has a non-canonical layer index {layer_s!r}", key)
    if module not in MODULES or BLOCK_OF[module] != block:
        raise AdapterError(f"tensor {key!r} names unknown module {block}.{module}; LoRA targets are "
                           f"self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj", key)
    return int(layer_s), module, ab


def pair_keys(keys) -> dict[tuple[int, str], Pair]:
    """Group keys into (layer, module) -> (A key, B key); refuses duplicates and unpaired halves."""
    halves: dict[tuple[int, str], dict[str, str]] = {}
    for key in keys:
        layer, module, ab = parse_key(key)
        slot = halves.setdefault((layer, module), {})
        if ab in slot:
            raise AdapterError(f"tensors {slot[ab]!r} and {key!r} both hold lora_{ab} of "
                               f"{module_path(layer, module)}", key)
        slot[ab] = key
    pairs = {}
    for lm, slot in sorted(halves.items()):
        for have, need in (("A", "B"), ("B", "A")):
            if have in slot and need not in slot:
                raise AdapterError(f"tensor {slot[have]!r} has no matching lora_{need} tensor; lora_A and "
                                   "lora_B must come in pairs", slot[have])
        pairs[lm] = (slot["A"], slot["B"])
    return pairs


def check_structure(header: dict[str, tuple[str, tuple[int, ...]]], config: LoraConfig,
                    spec: BaseModelSpec) -> dict[tuple[int, str], Pair]:
    """Header-only checks (no tensor data read yet); returns the validated (layer, module) -> keys map."""
    if config.max_rank > spec.max_lora_rank:
        field = "r" if config.r > spec.max_lora_rank else "rank_pattern"
        raise AdapterError(f"adapter_config.json: rank {config.max_rank} ({field}) exceeds this server's "
                           f"max LoRA rank {spec.max_lora_rank}", field)
    for layer in config.layers_to_transform or ():
        if layer >= spec.num_layers:
            raise AdapterError(f"adapter_config.json: layers_to_transform lists layer {layer} but the base model "
                               f"has {spec.num_layers} layers", "layers_to_transform")
    pairs = pair_keys(header)
    if not pairs:
        raise AdapterError("adapter_model.safetensors holds no LoRA weights", "adapter_model.safetensors")
    for (layer, module), (ka, kb) in pairs.items():
        if layer >= spec.num_layers:
            raise AdapterError(f"tensor {ka!r} is for layer {layer} but the base model has {spec.num_layers} "
                               "layers", ka)
        if module not in spec.modules:
            raise AdapterError(f"tensor {ka!r} targets {module}, which the base model does not have", ka)
        if not config.targets(layer, module):  # PEFT would silently ignore these weights: refuse instead
            raise AdapterError(f"tensor {ka!r} is for {module_path(layer, module)}, which adapter_config.json "
                               "does not target (target_modules / layers_to_transform / exclude_modules)", ka)
        (_, sa), (_, sb) = header[ka], header[kb]
        fin, fout = spec.modules[module]
        if len(sa) != 2 or sa[1] != fin:
            raise AdapterError(f"tensor {ka!r} has shape {list(sa)}; expected [r, {fin}] for {module}", ka)
        if len(sb) != 2 or sb[0] != fout:
            raise AdapterError(f"tensor {kb!r} has shape {list(sb)}; expected [{fout}, r] for {module}", kb)
        if sa[0] != sb[1]:
            raise AdapterError(f"tensor {kb!r} has rank {sb[1]} but its lora_A has rank {sa[0]}", kb)
        want = config.rank_for(layer, module)
        if sa[0] != want:
            raise AdapterError(f"tensor {ka!r} has rank {sa[0]} but adapter_config.json gives r={want} for "
                               f"{module_path(layer, module)} (r / rank_pattern)", ka)
        if sa[0] > spec.max_lora_rank:
            raise AdapterError(f"tensor {ka!r} has rank {sa[0]}, above this server's max LoRA rank "
                               f"{spec.max_lora_rank}", ka)
    for layer in range(spec.num_layers):
        for module in spec.modules:
            if config.targets(layer, module) and (layer, module) not in pairs:
                name = module_path(layer, module)
                raise AdapterError(f"adapter_config.json targets {name} but adapter_model.safetensors has no "
                                   "lora_A/lora_B weights for it", name)
    return pairs


def check_finite(tensors: dict[str, torch.Tensor], pairs: dict[tuple[int, str], Pair], dtype: torch.dtype) -> None:
    """Raise an AdapterError naming the first tensor with NaN/Inf, before or after casting to dtype."""
    for keys in pairs.values():
        for key in keys:
            t = tensors[key]
            cast = t.to(dtype)
            for src in (t,) if cast is t else (t, cast):
                if not bool(torch.isfinite(src).all()):
                    bad = "NaN" if bool(torch.isnan(src).any()) else "Inf"
                    how = "" if src is t else f" after casting to {dtype} (values overflow that dtype)"
                    raise AdapterError(f"tensor {key!r} contains {bad}{how}", key)


def all_finite(stacks) -> bool:
    """Fast check over cast tensors: min and max are finite only if every element is (NaN propagates through
    both). One aminmax pass costs ~1/13 of a float32 sum and ~1/30 of isfinite().all() (measured on CPU); callers
    still confirm a False with check_finite, which names the tensor."""
    for t in stacks:
        if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
            return False
    return True
