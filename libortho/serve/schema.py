"""Request bodies of the OpenAI HTTP API, as far as this server implements them.

Three kinds of field:
  * supported: model, prompt / messages, max_tokens, temperature, top_p, stop, seed, n (= 1),
    stream, stream_options.include_usage, and libortho's own `alpha`;
  * accepted and ignored, with a warning in the log (IGNORED_*): the client may send them, the
    answer is what it would be without them;
  * anything else: 400, as are wrong types (strict: "5" is not a number, 1.0 is not an integer).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("libortho.serve")

MAX_STOP = 4  # OpenAI's limit on stop sequences

IGNORED_COMPLETION = ("best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "presence_penalty",
                      "suffix", "user")
IGNORED_CHAT = ("frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "presence_penalty", "user",
                "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
                "store", "metadata", "service_tier", "modalities", "reasoning_effort", "prompt_cache_key",
                "safety_identifier", "verbosity")


class RequestError(ValueError):
    """A request body that is not valid JSON or does not fit the schema (-> HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    alpha: float | None = None  # libortho: the privacy switch, gated by the API key

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported; send several requests (the server batches them)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str]
    # accepted, ignored with a warning
    best_of: Any = None
    echo: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    presence_penalty: Any = None
    suffix: Any = None
    user: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send exactly one prompt per request (the server batches requests itself)")
        return prompt

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # accepted, ignored with a warning
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    user: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    verbosity: Any = None

    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) wins over max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(raw: bytes, model_cls: type[_Sampling]) -> tuple[_Sampling, list[str]]:
    """(validated request, names of the ignored fields it set), or RequestError."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    try:
        req = model_cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}"
        else:
            message = f"invalid value for {param!r}: {first['msg']}" if param else first["msg"]
        raise RequestError(message, param) from None
    ignored_names = IGNORED_COMPLETION if model_cls is CompletionRequest else IGNORED_CHAT
    ignored = [name for name in ignored_names if name in data]
    if ignored:
        log.warning("ignoring unsupported fields %s", ", ".join(ignored))
    return req, ignored
