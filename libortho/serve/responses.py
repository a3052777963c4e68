"""OpenAI's response bodies: a full completion, a streamed chunk, server-sent events.

`endpoint` is "completions" (/v1/completions) or "chat" (/v1/chat/completions). The alpha a
request was served at is echoed in `system_fingerprint` ("libortho:alpha=A").
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from .engine import Event
from .gate import shown


def fingerprint(alpha: float) -> str:
    return f"libortho:alpha={shown(alpha)}"


def usage(event: Event) -> dict:
    """The token counts of a finished request."""
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


@dataclass(frozen=True)
class Reply:
    """What every body of one request's answer repeats: its id, the model, the endpoint, the alpha."""

    rid: str
    model: str
    endpoint: str
    alpha: float

    def _envelope(self, kind: str, choice: dict) -> dict:
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model,
                "system_fingerprint": fingerprint(self.alpha), "choices": [choice]}

    def full_body(self, text: str, done: Event) -> dict:
        """The body of a request answered at once (not streamed)."""
        if self.endpoint == "completions":
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
            kind = "text_completion"
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
            kind = "chat.completion"
        return {**self._envelope(kind, choice), "usage": usage(done)}

    def chunk(self, content: str | dict | None, finish_reason: str | None = None) -> dict:
        """One streamed chunk. `content`: text; for chat also a whole delta (dict), or None for an empty one."""
        if self.endpoint == "completions":
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("text_completion", choice)
        delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk", choice)


def sse(body: dict) -> str:
    """One server-sent event carrying `body` as compact JSON."""
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # OpenAI's end-of-stream marker
