"""Incremental detokenization with stop strings: token ids in, safe text deltas out.

Text is released only when it is final: not the start of a multi-byte character still being
decoded (a trailing U+FFFD), and not a prefix of a stop string that the next tokens might
complete. When a stop string appears, the text before it is released and the stream ends.

Each token costs two decodes of a short window. With a transformers fast tokenizer they go
straight to its Rust backend (`decoder_of`): the wrapper's own work per call (argument
conversion) costs several times the decode, and the engine makes 2 calls per row per step.
"""
from __future__ import annotations

from typing import Callable

WINDOW = 8  # tokens a decode window grows to before it slides (longer: more characters decoded per call)


def decoder_of(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text, as `tokenizer.decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False)`; the backend's decode where that is exactly what the
    tokenizer's own decode does (a transformers fast tokenizer that does not override it)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        Tokenizer = PreTrainedTokenizerFast = None
    if (Tokenizer is not None and isinstance(backend, Tokenizer) and isinstance(tokenizer, PreTrainedTokenizerFast)
            and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
            and type(tokenizer).decode is PreTrainedTokenizerFast.decode):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class TextStream:
    """Feeds token ids, yields text deltas; `stopped` once a stop string was matched."""

    def __init__(self, tokenizer, stops: list[str], decode: Callable[[list[int]], str] | None = None) -> None:
        self.tokenizer = tokenizer
        self._decode = decode if decode is not None else decoder_of(tokenizer)  # the engine passes one, made once
        self.stops = [s for s in stops if s]
        self._matchers = [StopMatcher(s) for s in self.stops]
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were decoded last time, as context for the next delta
        self._read = 0
        self._context: str | None = ""  # the text of ids[_prefix:_read] when known (None: decode it)
        self.text = ""  # everything decoded so far (released + held back)
        self.released = 0  # len of the text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        # decode a short window, not the whole sequence: the prefix gives the tokenizer the context
        # it needs for spacing, and the delta is what the new tokens add to it. The window grows
        # up to WINDOW tokens before it slides, so the text of the window read so far is usually
        # known from the last call: one decode per token, not two.
        before = self._context if self._context is not None else self._decode(self.ids[self._prefix:self._read])
        self._context = before
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) < len(before):
            return self._release(final=False)  # an incomplete character: wait for the next token
        self._append(after[len(before):])
        if len(self.ids) - self._prefix > WINDOW:
            self._prefix, self._read, self._context = self._read, len(self.ids), None
        else:
            self._read, self._context = len(self.ids), after
        return self._release(final=False)

    def finish(self) -> str:
        """The stream ends (EOS, length, cancel): release what was held back for stop matching."""
        return self._release(final=True)

    def _append(self, delta: str) -> None:
        """Add decoded text; at the first stop string in it, cut the text there and stop."""
        start = len(self.text)
        self.text += delta
        hits = [hit for hit in (m.feed(delta, start) for m in self._matchers) if hit is not None]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        delta = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max((m.matched for m in self._matchers), default=0)


class StopMatcher:
    """Finds one stop string in text fed piece by piece (Knuth-Morris-Pratt): each character costs
    O(1) amortised, so the work per token does not grow with the stop string's length."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self._fallback = _prefix_function(stop)
        self.matched = 0  # the longest prefix of the stop string that the text fed so far ends with

    def feed(self, text: str, offset: int) -> int | None:
        """Feed the next characters (`offset`: where `text` starts in the whole text); the start of
        the first complete match in the whole text, or None."""
        stop, fallback, k = self.stop, self._fallback, self.matched
        for j, char in enumerate(text):
            while k and stop[k] != char:
                k = fallback[k - 1]
            if stop[k] == char:
                k += 1
            if k == len(stop):
                self.matched = k
                return offset + j + 1 - k
        self.matched = k
        return None


def _prefix_function(text: str) -> list[int]:
    """pi[i]: the length of the longest proper prefix of text[:i + 1] that is also its suffix."""
    pi = [0] * len(text)
    k = 0
    for i in range(1, len(text)):
        while k and text[i] != text[k]:
            k = pi[k - 1]
        if text[i] == text[k]:
            k += 1
        pi[i] = k
    return pi
