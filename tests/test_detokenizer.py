"""Incremental detokenizer (UTF-8 safe streaming) and stop-string matcher, property-tested."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from loramux.server.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from loramux.server.models.demo import ensure_demo_model
from loramux.server.models.tokenizer import Tokenizer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Characters of 1 to 4 UTF-8 bytes: ASCII, accents, CJK, emoji (incl. ZWJ sequences).
CHARS = list("ab z.\n") + ["é", "ß", "日", "本", "語", "😀", "👍", "\U0001F3FD", "\u200d", "€"]
TEXT = st.text(alphabet=st.sampled_from(CHARS), min_size=1, max_size=12)


@pytest.fixture(scope="module")
def demo_tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(ensure_demo_model(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory) -> Tokenizer:
    """A byte-level BPE whose merged tokens can end in the middle of a multi-byte character."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<|end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["日本語のテキスト 😀😀 👍🏽 ééé ab ab z.", "abz 日本 ß€ 😀ab"] * 30, trainer)
    d = Path(tmp_path_factory.mktemp("bpe"))
    tok.save(str(d / "tokenizer.json"))
    return Tokenizer.from_dir(d)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Tokenizer:
    """SentencePiece style (Llama 2): "▁" spaces stripped at the start, <0xXX> byte-fallback tokens."""
    from test_tokenizer import trained_tokenizer

    d = Path(tmp_path_factory.mktemp("sp"))
    trained_tokenizer("metaspace").save(str(d / "tokenizer.json"))
    return Tokenizer.from_dir(d)


def _stream(tok, prompt_ids, pieces, skip=True):
    """Push token chunks; return (chunks, flush text, the detokenizer). Checks prefix consistency."""
    out = [i for p in pieces for i in p]
    # The output continues the prompt (SentencePiece decoders drop a leading space only at the very start).
    full = tok.decode(prompt_ids + out, skip_special_tokens=skip)[len(tok.decode(prompt_ids, skip)):]
    det = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    chunks, so_far = [], ""
    for p in pieces:
        chunk = det.push(p)
        so_far += chunk
        chunks.append(chunk)
        assert full.startswith(so_far), (so_far, full)  # never a U+FFFD (or anything) that is not final
    tail = det.flush()
    assert so_far + tail == full == det.text
    return chunks, tail, det


def _split(ids, cuts):
    cuts = sorted({c % (len(ids) + 1) for c in cuts})
    bounds = [0] + cuts + [len(ids)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


@SETTINGS
@given(segments=st.lists(st.tuples(TEXT, st.sampled_from([None, None, 258, 261, 0x80, 0xE6, 0xF0])),
                         min_size=1, max_size=6),
       cuts=st.lists(st.integers(0, 200), max_size=12), skip=st.booleans(), prompt=TEXT)
def test_byte_tokens_stream_equals_full_decode(demo_tok, segments, cuts, skip, prompt):
    ids: list[int] = []
    for text, extra in segments:  # text split into single-byte tokens, then maybe a special or stray byte
        ids += demo_tok.encode(text, add_special_tokens=False) + ([extra] if extra is not None else [])
    chunks, tail, _ = _stream(demo_tok, demo_tok.encode(prompt), _split(ids, cuts), skip)
    assert "".join(chunks) + tail == demo_tok.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(texts=st.lists(TEXT, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 100), max_size=10),
       prompt=TEXT | st.just(""), sentencepiece=st.booleans())
def test_bpe_tokens_stream_equals_full_decode(bpe_tok, sp_tok, texts, cuts, prompt, sentencepiece):
    tok = sp_tok if sentencepiece else bpe_tok
    ids = tok.encode("".join(texts), add_special_tokens=False)
    assert all(i is not None for i in tok.convert_ids_to_tokens(ids))
    _stream(tok, tok.encode(prompt), _split(ids, cuts))


def test_multibyte_character_is_held_until_complete(demo_tok):
    det = IncrementalDetokenizer(demo_tok, [256])
    emoji = list("😀".encode())
    assert [det.push([b]) for b in emoji] == ["", "", "", "😀"]
    assert det.push([ord("a")]) == "a"
    det.push([0xE6, 0x97])  # first two bytes of 日, generation then ends
    assert det.flush() == "\ufffd"
    assert det.text == "😀a\ufffd"


def test_garbage_bytes_are_not_held_forever_and_window_stays_small(demo_tok):
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return demo_tok.decode(ids, skip_special_tokens)

    det = IncrementalDetokenizer(Counting(), list(range(65, 90)))
    emitted = "".join(det.push([0x80]) for _ in range(100))
    assert emitted and emitted == "\ufffd" * len(emitted)
    assert max(calls) <= 40  # bounded hold-back window
    calls.clear()
    for _ in range(3000):
        det.push(list("日".encode()) + [ord("x")])
    assert max(calls[4:]) <= 8  # decode work per token does not grow with the length of the output
    assert det.flush() == ""
    assert det.text == "\ufffd" * 100 + "日x" * 3000


@SETTINGS
@given(text=st.text(alphabet="abcx", max_size=30), cuts=st.lists(st.integers(0, 40), max_size=10),
       stops=st.lists(st.text(alphabet="abcx", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_strings_across_chunks(text, cuts, stops):
    matcher = StopStringMatcher(stops)
    # Reference: stream one character at a time, stop when a stop string ends here (the longest on a tie).
    hits = [(e, -len(s)) for e in range(1, len(text) + 1) for s in stops if text[:e].endswith(s)]
    expect = text[:min(hits)[0] + min(hits)[1]] if hits else text
    emitted, stopped = "", False
    for piece in _split(text, cuts) if text else [""]:
        out, stopped = matcher.feed(piece)
        emitted += out
        assert expect.startswith(emitted)
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    assert stopped == bool(hits)
    assert emitted == expect
    assert not stopped or matcher.matched in stops and matcher.feed("more") == ("", True)


def test_stop_string_examples():
    m = StopStringMatcher(["</end>", "STOP"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("nd") == ("", False)
    assert m.feed("> tail") == ("", True) and m.matched == "</end>"
    m = StopStringMatcher(["bcd", "abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("cd") == ("", True) and m.matched == "abc"
    m = StopStringMatcher(["a", "baa"])  # "a" completes before "baa" would
    assert m.feed("baa") == ("b", True) and m.matched == "a"
    m = StopStringMatcher(["ab"])
    assert m.feed("xa") == ("x", False) and m.flush() == "a"
    assert StopStringMatcher([]).feed("anything") == ("anything", False)
    assert StopStringMatcher([""]).feed("x") == ("x", False)
