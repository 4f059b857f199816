"""Tokenizer: HF `tokenizer.json` via the tokenizers library, special tokens, sandboxed chat templates."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points from 256."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


class ChatTemplateError(ValueError):
    """The chat template is missing, invalid, or failed while rendering."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def _token_str(value: Any) -> str | None:
    """Special tokens are stored as plain strings or as serialized AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# ---- sandboxed jinja2 environment (same helpers and options as HF's apply_chat_template) ----

def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


_ENV = _make_env()


def _plain(value: Any) -> Any:
    """Deep copy of messages as plain JSON data, so templates never see (or mutate) caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (bool, int, float, str):  # subclasses (e.g. str enums) → the plain base value
        if isinstance(value, base):
            return base(value)
    return str(value)


class Tokenizer:
    """A Hugging Face fast tokenizer folder, loaded without transformers (same ids as HF)."""

    def __init__(self, backend: Any, config: dict, generation_config: dict | None = None,
                 chat_template: str | None = None) -> None:
        from tokenizers import AddedToken

        self._tok = backend
        self.config = config
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        self.special_tokens = {n: t for n in names if (t := _token_str(config.get(n)))}
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in self.special_tokens.values() if t not in vocab]
        for entry in (config.get("added_tokens_decoder") or {}).values():
            content = _token_str(entry)
            if content and content not in vocab and content not in missing:
                missing.append(content)
        if missing:  # HF adds named special tokens absent from tokenizer.json
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = self.bos_token_id is not None and self.bos_token_id in self.encode("", True)
        # BOS/EOS insertion comes from tokenizer.json's post-processor alone. transformers 5 does the same: it
        # drops tokenizer_config's add_bos_token/add_eos_token whenever a tokenizer.json exists.
        gen_eos = (generation_config or {}).get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.eos_token_ids: list[int] = []
        for i in ([eos_id] if eos_id is not None else []) + gen_eos:
            if isinstance(i, int) and i not in self.eos_token_ids:
                self.eos_token_ids.append(i)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._specials = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        decoder = backend.decoder
        self._byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: Path | str) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj}: tokenizer.json not found (a fast tokenizer file is required)")
        try:
            backend = Backend.from_file(str(tj))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise ValueError(f"{tj}: cannot load tokenizer ({e})") from e
        config = _read_json(path / "tokenizer_config.json")
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)  # tokenizer_config.json wins, as in HF
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"  # newer HF folders keep the template in its own file
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, config, _read_json(path / "generation_config.json"),
                   template if isinstance(template, str) else None)

    # ---- ids <-> text ----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token (special tokens included), for logprob display."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (OpenAI's logprobs `bytes`), also for partial UTF-8 characters."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._specials:
            return piece.encode()
        if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if "\u2581" in piece:  # SentencePiece's space marker; decoding one token alone would strip it
            return piece.replace("\u2581", " ").encode()
        return self.token_text(token_id).encode()

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def backend(self) -> Any:
        """The underlying `tokenizers.Tokenizer` (for batch encoding)."""
        return self._tok

    # ---- chat ----

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    template: str | None = None, **kwargs: Any) -> str:
        """Render `messages` with the chat template in a sandbox; any failure raises ChatTemplateError."""
        source = template if template is not None else self.chat_template
        if not source:
            raise ChatTemplateError("this model has no chat template; use the completions API or "
                                    "supply a chat template")
        try:
            compiled = _compile(source)
        except Exception as e:
            raise ChatTemplateError(f"invalid chat template: {e}") from e
        variables = {k: v for k, v in self.special_tokens.items()}
        variables.update(kwargs)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return compiled.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                                   **{k: _plain(v) for k, v in variables.items()})
        except Exception as e:  # TemplateError, SecurityError, TypeError from template code, ...
            raise ChatTemplateError(f"chat template failed: {e}") from e


_COMPILED: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    compiled = _COMPILED.get(source)
    if compiled is None:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        compiled = _COMPILED[source] = _ENV.from_string(source)
    return compiled
