"""Incremental detokenization and stop strings for streamed text.

Decoding token by token breaks multi-byte characters and merges that depend on neighbours, so text is
decoded over a short window of previous tokens and only the part past the already emitted prefix is
released, and never while it ends in an incomplete UTF-8 sequence (``\\ufffd``). Stop strings are cut
as OpenAI does (the stop text itself is not returned); up to ``len(longest stop) - 1`` characters are
held back while they could still be the start of one.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens whose text has been released

    def push(self, new_ids: list[int]) -> str:
        """Add tokens, return the newly complete text (possibly empty)."""
        self._ids.extend(new_ids)
        decode = self._tok.decode
        window = self._ids[self._prefix :]
        prefix_text = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        full_text = decode(window, skip_special_tokens=True)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to ``\\ufffd``)."""
        decode = self._tok.decode
        prefix_text = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        full_text = decode(self._ids[self._prefix :], skip_special_tokens=True)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class StopMatcher:
    """Feed text deltas; get back what may be released and whether a stop string was reached."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        if self.stopped or not delta:
            return ""
        if not self._stops:
            return delta
        text = self._pending + delta
        cut = -1
        for stop in self._stops:
            pos = text.find(stop)
            if pos != -1 and (cut == -1 or pos < cut):
                cut, self.matched = pos, stop
        if cut != -1:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        release = len(text) - self._hold
        if release <= 0:
            self._pending = text
            return ""
        self._pending = text[release:]
        return text[:release]

    def flush(self) -> str:
        """Release the held-back tail at the end of the generation."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
