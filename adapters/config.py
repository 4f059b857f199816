"""Parse and resolve a PEFT LoRA adapter_config.json with PEFT's own matching semantics."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterError, unsupported
from .spec import MODULES, module_path

try:  # the regex parser moved in 3.11; used only to refuse catastrophic-backtracking patterns
    from re import _constants as _sc, _parser as _sp
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sc  # type: ignore[no-redef]
    import sre_parse as _sp  # type: ignore[no-redef]

MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERN_LEN = 512
MAX_PATTERN_KEYS = 4096
# Config keys whose non-empty value changes the forward pass in ways a plain LoRA server cannot honour.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA", "lora_bias": "a trained bias on lora_B", "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trainable tokens", "target_parameters": "parameter targeting",
    "layer_replication": "layer replication", "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron-sharded LoRA",
}
_REPEATS = {_sc.MAX_REPEAT, _sc.MIN_REPEAT} | ({_sc.POSSESSIVE_REPEAT} if hasattr(_sc, "POSSESSIVE_REPEAT") else set())


def _children(av: Any):
    if isinstance(av, _sp.SubPattern):
        yield av
    elif isinstance(av, (list, tuple)):
        for x in av:
            yield from _children(x)


def _walk(sub, in_loop: bool, field_: str) -> None:
    for op, av in sub:
        if op in (_sc.GROUPREF, _sc.GROUPREF_EXISTS):
            raise AdapterError(f"{field_}: backreferences are not allowed in patterns", field_)
        loop = in_loop
        if op in _REPEATS:
            if av[1] > 1:
                if in_loop:
                    raise AdapterError(f"{field_}: nested repetition such as (a+)+ is not allowed in patterns "
                                       "(it can take exponential time)", field_)
                loop = True
        elif op is _sc.BRANCH and in_loop:
            raise AdapterError(f"{field_}: alternation inside a repetition is not allowed in patterns "
                               "(it can take exponential time)", field_)
        for child in _children(av):
            _walk(child, loop, field_)


def safe_regex(pattern: Any, field_: str) -> re.Pattern:
    """Compile a user regex after refusing over-long or backtracking-prone ones (no timeout exists in `re`)."""
    if not isinstance(pattern, str) or not pattern:
        raise AdapterError(f"{field_}: a pattern must be a non-empty string", field_)
    if len(pattern) > MAX_PATTERN_LEN:
        raise AdapterError(f"{field_}: pattern longer than {MAX_PATTERN_LEN} characters", field_)
    try:
        _walk(_sp.parse(pattern), False, field_)
        return re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"{field_}: invalid regular expression {pattern!r} ({exc})", field_) from exc


def _int(v: Any, field_: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise AdapterError(f"adapter_config.json: {field_} must be an integer, got {v!r}", field_)
    if v < minimum:
        raise AdapterError(f"adapter_config.json: {field_} must be >= {minimum}, got {v}", field_)
    return v


def _num(v: Any, field_: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AdapterError(f"adapter_config.json: {field_} must be a finite number, got {v!r}", field_)
    return float(v)


def _patterns(raw: Any, field_: str, value) -> tuple[tuple[str, re.Pattern, Any], ...]:
    """rank_pattern/alpha_pattern -> ordered (key, compiled PEFT wrapper, value); PEFT takes the first match."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or len(raw) > MAX_PATTERN_KEYS:
        raise AdapterError(f"adapter_config.json: {field_} must be an object of at most {MAX_PATTERN_KEYS} "
                           "entries", field_)
    out = []
    for key, v in raw.items():
        safe_regex(key, f"{field_}[{key!r}]")
        # PEFT matches the key as a regex against a dotted suffix of the module's full name.
        out.append((key, re.compile(rf"(.*\.)?({key})$"), value(v, f"{field_}[{key!r}]")))
    return tuple(out)


@dataclass(frozen=True)
class LoraConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # list of names (suffix match) or one regex (full match)
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, re.Pattern, int], ...] = ()
    alpha_pattern: tuple[tuple[str, re.Pattern, float], ...] = ()
    layers_to_transform: tuple[int, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def max_rank(self) -> int:
        """Largest rank any module can have (vLLM checks every rank_pattern value, used or not)."""
        return max([self.r, *(v for _, _, v in self.rank_pattern)])

    def _matches(self, name: str) -> bool:
        ex = self.exclude_modules
        if isinstance(ex, str) and re.fullmatch(ex, name):
            return False
        if isinstance(ex, tuple) and (name in ex or any(name.endswith("." + e) for e in ex)):
            return False
        tm = self.target_modules
        if isinstance(tm, str):  # PEFT: regex full-match; layers_to_transform is then ignored
            return re.fullmatch(tm, name) is not None
        if name in tm:  # exact full name: PEFT skips the layer filter too
            return True
        if not any(name.endswith("." + t) for t in tm):
            return False
        if not self.layers_to_transform:  # None or [] both mean every layer
            return True
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # first numbered segment = layer index
        return m is not None and int(m["idx"]) in self.layers_to_transform

    def targets(self, layer: int, module: str) -> bool:
        return module in MODULES and self._matches(module_path(layer, module))

    @staticmethod
    def _lookup(patterns, name: str, default):
        for _, rx, v in patterns:
            if rx.match(name):
                return v
        return default

    def rank_for(self, layer: int, module: str) -> int:
        return self._lookup(self.rank_pattern, module_path(layer, module), self.r)

    def alpha_for(self, layer: int, module: str) -> float:
        return self._lookup(self.alpha_pattern, module_path(layer, module), self.lora_alpha)

    def scale_for(self, layer: int, module: str) -> float:
        r, alpha = self.rank_for(layer, module), self.alpha_for(layer, module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _target_modules(raw: Any) -> tuple[str, ...] | str:
    if raw is None:
        raise AdapterError("adapter_config.json: target_modules is required", "target_modules")
    if isinstance(raw, str):
        if raw.lower() == "all-linear":  # PEFT shorthand: every linear layer but the output head
            return MODULES
        safe_regex(raw, "target_modules")
        return raw
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) and t for t in raw):
        raise AdapterError("adapter_config.json: target_modules must be a regex string or a non-empty list "
                           "of module names", "target_modules")
    for t in raw:
        leaf = t.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "lm_head"):
            raise unsupported(f"adapter_config.json: target_modules contains {t!r}; LoRA on embeddings or "
                              "lm_head is not supported", "target_modules")
        if leaf not in MODULES:
            raise unsupported(f"adapter_config.json: target_modules contains {t!r}, which is not a supported "
                              f"LoRA target (supported: {', '.join(MODULES)})", "target_modules")
    return tuple(raw)


def parse_lora_config(data: bytes | str | dict) -> LoraConfig:
    """bytes/str (JSON) or dict -> LoraConfig; every refusal is an AdapterError naming the field."""
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_CONFIG_BYTES:
            raise AdapterError(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes",
                               "adapter_config.json", 413)
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise AdapterError(f"adapter_config.json is not valid JSON ({exc})", "adapter_config.json") from exc
    if not isinstance(data, dict):
        raise AdapterError("adapter_config.json must be a JSON object", "adapter_config.json")
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        raise unsupported(f"adapter_config.json: peft_type {peft_type!r} is not supported; only LORA adapters "
                          "can be served", "peft_type")
    for key, what in _UNSUPPORTED_FEATURES.items():
        if data.get(key):
            raise unsupported(f"adapter_config.json: {key} ({what}) is not supported", key)
    bias = data.get("bias", "none")
    if bias != "none":
        raise unsupported(f"adapter_config.json: bias={bias!r} is not supported; only bias='none' adapters "
                          "can be served", "bias")
    lp = data.get("layers_pattern")
    if lp not in (None, "", [], "layers", ["layers"]):
        raise unsupported(f"adapter_config.json: layers_pattern {lp!r} is not supported; Llama-family models "
                          "only have 'layers'", "layers_pattern")
    ltt = data.get("layers_to_transform")
    if isinstance(data.get("target_modules"), str) and (ltt is not None or lp is not None):
        field_ = "layers_to_transform" if ltt is not None else "layers_pattern"
        raise AdapterError(f"adapter_config.json: {field_} cannot be used when target_modules is a regex string",
                           field_)
    if lp and ltt is None:  # PEFT refuses this combination too
        raise AdapterError("adapter_config.json: layers_pattern needs layers_to_transform", "layers_pattern")
    if ltt is not None:
        items = [ltt] if isinstance(ltt, int) and not isinstance(ltt, bool) else ltt
        if not isinstance(items, list):
            raise AdapterError("adapter_config.json: layers_to_transform must be an integer or a list of "
                               "integers", "layers_to_transform")
        ltt = tuple(_int(i, "layers_to_transform", 0) for i in items)
    ex = data.get("exclude_modules")
    if ex is not None:
        if isinstance(ex, str):
            safe_regex(ex, "exclude_modules")
        elif isinstance(ex, list) and all(isinstance(e, str) for e in ex):
            ex = tuple(ex)
        else:
            raise AdapterError("adapter_config.json: exclude_modules must be a regex string or a list of "
                               "names", "exclude_modules")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(data.get(flag, False), bool):
            raise AdapterError(f"adapter_config.json: {flag} must be true or false", flag)
    base = data.get("base_model_name_or_path")
    return LoraConfig(
        r=_int(data.get("r", 8), "r", 1),
        lora_alpha=_num(data.get("lora_alpha", 8), "lora_alpha"),
        target_modules=_target_modules(data.get("target_modules")),
        use_rslora=data.get("use_rslora", False),
        rank_pattern=_patterns(data.get("rank_pattern"), "rank_pattern", lambda v, f: _int(v, f, 1)),
        alpha_pattern=_patterns(data.get("alpha_pattern"), "alpha_pattern", _num),
        layers_to_transform=ltt, exclude_modules=ex,
        # Llama-family projections are nn.Linear, for which PEFT forces fan_in_fan_out off: A/B keep their
        # [r, in] / [out, r] layout either way, so the flag is accepted and has no effect on loading.
        fan_in_fan_out=data.get("fan_in_fan_out", False), bias=bias,
        base_model_name_or_path=base if isinstance(base, str) else None, raw=data,
    )
