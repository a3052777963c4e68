"""Request bodies of the OpenAI HTTP API, as far as this server implements them.

Three kinds of field:
  * supported: model, prompt / messages, max_tokens, temperature, top_p, stop, seed, n (= 1),
    stream, stream_options.include_usage, and libortho's own `alpha`;
  * accepted and ignored, with a warning in the log (IGNORED_*): the client may send them, the
    answer is what it would be without them;
  * anything else: 400, as are wrong types (strict: "5" is not a number, 1.0 is not an integer).

A body is refused (400, never 500) when it is not JSON in any way Python's parser can fail: nested
too deeply, an integer of more digits than Python converts, or a lone UTF-16 surrogate in a string
the server uses. Counts are checked against the server's limits (`ServeConfig.max_messages`,
`max_stops`, `max_stop_chars`) before the body is validated, so a huge list costs no validation.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import jsontext
from .config import ServeConfig

log = logging.getLogger("libortho.serve")

SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escapes parse to these, which no encoder accepts

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
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def texts(self) -> Iterator[tuple[str, str]]:
        """(param, text) of every string the server uses: it must be encodable text."""
        yield "model", self.model
        for s in self.stop_list():
            yield "stop", s

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

    def texts(self) -> Iterator[tuple[str, str]]:
        yield "prompt", self.prompt_text()
        yield from super().texts()


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

    def texts(self) -> Iterator[tuple[str, str]]:
        for m in self.messages:
            yield "messages", m.text()
            if m.name is not None:
                yield "messages", m.name
        yield from super().texts()


def parse_object(raw: bytes, limits: ServeConfig) -> dict:
    """The body as a JSON object within the server's limits (values, messages, stop strings), not yet
    checked against a schema; RequestError otherwise."""
    data = _json(raw, limits.max_json_values)
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    _check_counts(data, limits)
    return data


def parse_body(raw: bytes, model_cls: type[_Sampling], limits: ServeConfig) -> tuple[_Sampling, list[str]]:
    """(validated request, names of the ignored fields it set), or RequestError."""
    data = parse_object(raw, limits)
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
    _check_text(req)
    ignored_names = IGNORED_COMPLETION if model_cls is CompletionRequest else IGNORED_CHAT
    ignored = [name for name in ignored_names if name in data]
    if ignored:
        log.warning("ignoring unsupported fields %s", ", ".join(ignored))
    return req, ignored


def json_values(raw: bytes, limit: int) -> int:
    """About how many values json.loads would build from `raw` (commas, brackets and braces outside
    strings, or strings): exact enough to bound the parser's work, found by byte scans alone, so
    that counting costs far less than parsing. Counts above `limit` may stop early (still > limit)."""
    quick = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1  # strings' commas too: an overestimate
    if quick <= limit:
        return quick
    plain = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes gone, every quote left opens or closes a string
    strings = plain.count(b'"') // 2
    if strings > limit:
        return strings
    outside = b"".join(plain.split(b'"')[0::2])
    return max(strings, outside.count(b",") + outside.count(b"[") + outside.count(b"{") + 1)


def _json(raw: bytes, limit: int) -> object:
    """The parsed body, or RequestError for every way the parser fails (jsontext: nesting too deep)."""
    if json_values(raw, limit) > limit:
        raise RequestError(f"the request body has more than {limit} JSON values, the most this server parses")
    try:
        return jsontext.loads(raw)
    except json.JSONDecodeError as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise RequestError(f"the request body is not UTF-8 text: {err.reason} at byte {err.start}") from None
    except ValueError:  # int() refuses numbers of more digits than sys.get_int_max_str_digits()
        raise RequestError("the request body holds an integer of too many digits to read") from None


def _check_counts(data: dict, limits: ServeConfig) -> None:
    """RequestError when the body has more messages or stop strings, or longer stop strings, than the
    server allows. Values of the wrong type are left to the schema, which names the type it expects."""
    messages = data.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise RequestError(f"at most {limits.max_messages} messages per request, got {len(messages)}", "messages")
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stops:
        raise RequestError(f"at most {limits.max_stops} stop sequences, got {len(stops)}", "stop")
    if any(isinstance(s, str) and len(s) > limits.max_stop_chars for s in stops):
        raise RequestError(f"a stop sequence may have at most {limits.max_stop_chars} characters", "stop")


def _check_text(req: _Sampling) -> None:
    """RequestError when a string the server uses holds a lone surrogate, which is not text."""
    for param, text in req.texts():
        if not text.isascii() and (found := SURROGATE.search(text)):
            raise RequestError(f"invalid value for {param!r}: it holds a lone surrogate (U+{ord(found.group()):04X}), "
                               "which is not a character", param)
