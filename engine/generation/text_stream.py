"""Text of a sequence as it grows: incremental detokenizing and stop strings. Pure, so
unit-tested directly; the generation core (engine/generation/scheduler.py) drives them."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without re-decoding everything and without
    ever splitting a multi-byte character (a partial UTF-8 sequence decodes to U+FFFD, which
    is held back until the next token completes it)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode  # the backend's detokenize (special tokens skipped)
        self.tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        # Decode a short window so tokenizers that merge spaces across tokens stay right.
        prefix = self._decode(self.tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self.tokens[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
            return full[len(prefix):]
        return ""


class StopStringMatcher:
    """Finds stop strings in generated text and says how much text is safe to stream: text that
    could be the start of a stop string is held back until it is decided."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> int:
        """Index of the earliest stop string that overlaps text[new_from:], or -1."""
        if not self.stops:
            return -1
        start = max(0, new_from - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def safe_length(self, text: str) -> int:
        """How much of text can be emitted: all of it minus a suffix that is a proper prefix of
        some stop string."""
        for keep in range(min(self._longest - 1, len(text)), 0, -1):
            suffix = text[-keep:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return len(text) - keep
        return len(text)
