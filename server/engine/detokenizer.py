"""Incremental detokenization (never emits broken UTF-8) and stop-string matching across token boundaries."""
from __future__ import annotations

from typing import Any

# Window of prompt tokens used as left context, so tokenizers whose decoders strip or merge at the start
# of a sequence (SentencePiece "▁", byte fallback) decode the first output tokens as a continuation.
_CONTEXT_TOKENS = 5
# An unfinished UTF-8 character spans at most 4 byte tokens: the clean token boundary before it is searched
# within that many trailing tokens.
_MAX_PENDING_TOKENS = 4
# This many tokens without any new text means garbage bytes, not an unfinished character (which completes
# within 3 more bytes): emit them as decoded (U+FFFD included) and start afresh, bounding the window.
_MAX_STALLED_TOKENS = 8


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text chunks; O(1) decode work per token."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: tokens [prefix, read) are already emitted context
        self._read = len(self._ids)  # tokens before this have been turned into text
        self._prefix_text = self._decode(self._prefix, self._read)
        self._chunks: list[str] = []
        self._sent = 0  # characters of the current window's new text already emitted
        self._stalled = 0  # tokens pushed since the window's text last grew (garbage detection)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def push(self, token_ids: list[int]) -> str:
        """Add new output tokens; return the newly completed text (possibly "")."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        end = len(self._ids)
        full = self._decode(self._prefix)
        if not full.endswith("\ufffd"):
            return self._advance(full, end)
        # An unfinished character: close the window at the last clean token boundary before it, if any.
        for k in range(1, min(_MAX_PENDING_TOKENS, end - self._read) + 1):
            part = self._decode(self._prefix, end - k)
            if not part.endswith("\ufffd"):
                return self._advance(part, end - k)
        # Tokens straddle character boundaries here: emit the text before the U+FFFD run, keep the window open.
        new = full.rstrip("\ufffd")[len(self._prefix_text) + self._sent:]
        self._stalled = 0 if new else self._stalled + len(token_ids)
        if self._stalled > _MAX_STALLED_TOKENS:
            return self._advance(full, end)
        self._sent += len(new)
        if new:
            self._chunks.append(new)
        return new

    def _advance(self, text: str, upto: int) -> str:
        """Emit the rest of text = decode(ids[prefix:upto]); the next window starts at `upto`."""
        # The window's earlier tokens decode to prefix_text; what follows it is new (minus what was already sent).
        new = text[len(self._prefix_text) + self._sent:]
        self._stalled = 0
        if upto > self._read:
            self._sent = 0
            self._prefix, self._read = self._read, upto
            self._prefix_text = self._decode(self._prefix, self._read)
        else:
            self._sent += len(new)
        # Drop tokens that can no longer be part of the window (keeps memory O(window)).
        if self._prefix > 64:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        if new:
            self._chunks.append(new)
        return new

    def flush(self) -> str:
        """End of generation: return any held-back text (e.g. a truncated multi-byte character)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._prefix), len(self._ids))

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""


class StopStringMatcher:
    """Finds the first completed stop string in streamed text; holds back a suffix that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._max = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended generation

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return new_text, False
        buf = self._held + new_text
        # The stop string that completes first wins (as if streamed one character at a time; on a tie the
        # longer one). A match may start in the held-back part and end in the new text.
        start = max(0, len(self._held) - self._max + 1)
        best_end, best = -1, ""
        for s in self.stops:
            i = buf.find(s, start)
            end = i + len(s)
            if i >= 0 and (best_end < 0 or end < best_end or (end == best_end and len(s) > len(best))):
                best_end, best = end, s
        if best_end >= 0:
            self.stopped, self.matched, self._held = True, best, ""
            return buf[:best_end - len(best)], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self._max - 1, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """Generation ended for another reason: release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
