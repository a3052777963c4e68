"""Incremental detokenization with stop strings: token ids in, safe text deltas out.

Text is released only when it is final: not the start of a multi-byte character still being
decoded (a trailing U+FFFD), and not a prefix of a stop string that the next tokens might
complete. When a stop string appears, the text before it is released and the stream ends.
"""
from __future__ import annotations


class TextStream:
    """Feeds token ids, yields text deltas; `stopped` once a stop string was matched."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] were decoded last time, as context for the next delta
        self._read = 0
        self.text = ""  # everything decoded so far (released + held back)
        self.released = 0  # len of the text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        # decode a short window, not the whole sequence: the prefix gives the tokenizer the context
        # it needs for spacing, and the delta is what the new tokens add to it
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) < len(before):
            return self._release(final=False)  # an incomplete character: wait for the next token
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The stream ends (EOS, length, cancel): release what was held back for stop matching."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = max(0, self.released - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            self.stopped = True
            final = True
        end = len(self.text)
        if not final:
            end -= self._held_back()
        delta = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
