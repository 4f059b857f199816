"""Tokenizer vs transformers' fast tokenizer (ids, decode, specials) and the sandboxed chat template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramux.server.models.demo import ensure_demo_model
from loramux.server.models.tokenizer import ChatTemplateError, Tokenizer

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "héllo wörld 😀 日本語のテキスト",
         "<s>inline special</s> text", "", "a", "numbers 12345 and punctuation!?", "\u00a0\u200b odd spaces"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizers",
          "日本語 and emoji 😀 mixed in text", "numbers 0123456789 and more words"] * 20

# A template of our own that exercises what HF templates use: namespace, loop filters, tojson, trim/lstrip.
TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% endfor -%}
{{ bos_token }}
{%- if ns.system %}[SYS]{{ ns.system }}[/SYS]{% endif %}
{%- if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}
{% for m in messages if m['role'] != 'system' %}
    {% if (loop.index0 % 2 == 0) != (m['role'] == 'user') %}
        {{ raise_exception('roles must alternate user/assistant') }}
    {% endif %}
    {% if m['role'] == 'user' %}
[INST] {{ m['content'] | trim }} [/INST]
    {% else %}
 {{ m['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<answer>{% endif %}"""


def _hf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def trained_tokenizer(kind: str):
    """A small BPE trained here; kind picks the pre-tokenizer / post-processor style."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<|begin|>", "<|eot|>"]
    if kind == "metaspace":  # SentencePiece style (Llama 2): "▁" for spaces, <0xXX> byte-fallback tokens
        tok = Backend(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                            show_progress=False))
        model = json.loads(tok.to_str())["model"]
        learned = sorted(model["vocab"], key=model["vocab"].get)[len(specials):]
        vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + learned)}
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok = Backend(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if kind == "template":  # Llama-3 style: BOS comes from tokenizer.json's post-processor
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B", special_tokens=[("<|begin|>", 3)])
    elif kind == "bytelevel":  # Qwen2 style: no BOS at all
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


CONFIGS = {
    "bos_flag": ("plain", {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}),
    "bos_eos_flags": ("plain", {"bos_token": {"__type": "AddedToken", "content": "<s>", "special": True,
                                              "lstrip": False, "rstrip": False, "normalized": False,
                                              "single_word": False}, "eos_token": "</s>",
                                "add_bos_token": True, "add_eos_token": True}),
    "no_flags_no_pp": ("plain", {"bos_token": "<s>", "eos_token": "</s>"}),
    "template_pp": ("template", {"bos_token": "<|begin|>", "eos_token": "<|eot|>"}),
    "template_pp_flag_off": ("template", {"bos_token": "<|begin|>", "eos_token": "<|eot|>",
                                          "add_bos_token": False}),
    "bytelevel_pp": ("bytelevel", {"eos_token": "<|eot|>", "pad_token": "<|eot|>"}),
    "metaspace": ("metaspace", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                "add_bos_token": True}),
    "new_special": ("plain", {"bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True}),
}


def _write(tmp: Path, name: str, **extra) -> Path:
    kind, cfg = CONFIGS[name]
    d = tmp / name
    d.mkdir()
    trained_tokenizer(kind).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **cfg, **extra}))
    return d


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trained_tokenizers_match_hf(tmp_path, name):
    d = _write(tmp_path, name)
    ours, hf = Tokenizer.from_dir(d), _hf(d)
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids == ([hf.eos_token_id] if hf.eos_token_id is not None else [])
    for text in TEXTS:
        for special in (True, False):
            ids = hf(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_demo_tokenizer_matches_hf(demo_dir):
    ours, hf = Tokenizer.from_dir(demo_dir), _hf(demo_dir)
    assert ours.vocab_size == len(hf) == 262
    assert ours.bos_token_id == 256 and ours.eos_token_ids == [257, 261]
    for text in TEXTS + ["<|user|>hi<|end|><|assistant|>"]:
        ids = hf(text)["input_ids"]
        assert ids[0] == 256
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert ours.encode("é", add_special_tokens=False) == list("é".encode())  # one token per byte
    assert ours.token_text(ord("a")) == "a" and ours.token_text(261) == "<|end|>"
    assert [ours.token_bytes(i) for i in (0xE6, 0x20, ord("a"), 261)] == [b"\xe6", b" ", b"a", b"<|end|>"]


@pytest.mark.parametrize("kind", ["plain", "metaspace"])
def test_token_bytes_concatenate_to_the_text(tmp_path, kind):
    trained_tokenizer(kind).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        assert raw.decode() in (text, " " + text)  # SentencePiece prepends a space marker


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_hf(demo_dir, tmp_path, gen):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there  "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather? 日本"}]
    hf = _hf(demo_dir)
    ours = Tokenizer.from_dir(demo_dir)
    assert ours.render_chat(chat, add_generation_prompt=gen) == \
        hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"q": "日本"}}}]
    for kwargs in ({}, {"tools": tools}):
        assert ours.render_chat(chat, add_generation_prompt=gen, template=TEMPLATE, **kwargs) == \
            hf.apply_chat_template(chat, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=gen,
                                   **kwargs)
    # content given as a list of parts
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert ours.render_chat(parts) == "<s><|user|>ab<|end|><|assistant|>"


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set ns = namespace(_secret=1) %}{{ ns._secret }}",
    "{% set x = messages.append(1) %}",
    "{{ raise_exception('custom failure') }}",
    "{% for %}",  # syntax error
    "{{ messages[0]['content'] + 1 }}",  # TypeError inside the template
])
def test_bad_templates_raise_chat_template_error(demo_dir, template):
    tok = Tokenizer.from_dir(demo_dir)
    with pytest.raises(ChatTemplateError):
        tok.render_chat([{"role": "user", "content": "x"}], template=template)


def test_demo_template_rejects_unknown_role(demo_dir):
    with pytest.raises(ChatTemplateError, match="Unsupported role"):
        Tokenizer.from_dir(demo_dir).render_chat([{"role": "tool", "content": "x"}])


def test_no_template_and_missing_files(tmp_path):
    d = _write(tmp_path, "bos_flag")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer.from_dir(d).render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_config_variants(tmp_path):
    d = _write(tmp_path, "no_flags_no_pp", chat_template=[{"name": "default", "template": "D"},
                                                          {"name": "tool_use", "template": "T"}])
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template == "D"
    assert tok.eos_token_ids == [2, 4]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == [2, 4]
    assert tok.render_chat([{"role": "user", "content": "x"}]) == "x!"
    # special tokens only in special_tokens_map.json
    e = tmp_path / "stm"
    e.mkdir()
    trained_tokenizer("plain").save(str(e / "tokenizer.json"))
    (e / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(e)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.render_chat([{"role": "user", "content": "x"}], template="{{ bos_token }}|{{ eos_token }}") \
        == "<s>|</s>"
