"""One generation request, from HTTP to the engine and back.

In order: refused while draining (503), authenticated (401), its body validated (400), its alpha
granted (400 / 403), its model checked (404), its prompt tokenized and its token budget fitted to
the context (400), then submitted (429 when the queue is full) and answered at once or streamed.
Every refusal is counted in the metrics, with the alpha when one was granted.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from .engine import EngineStopped, Event, Job, QueueFull
from .errors import APIError
from .gate import ALPHA_HEADER, Caller, GateError, Grant
from .responses import Reply
from .sampling import SamplingParams
from .schema import ChatRequest, CompletionRequest, RequestError, parse_body
from .state import ServerState
from .streaming import EventStream, Finisher, collect, event_sink, stream

log = logging.getLogger("libortho.serve")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
BODIES = {"completions": CompletionRequest, "chat": ChatRequest}  # endpoint -> its request body
ID_PREFIXES = {"completions": "cmpl-", "chat": "chatcmpl-"}  # OpenAI's response id prefixes


@dataclass(frozen=True)
class Admitted:
    """A request that passed every check: what the engine needs to run it."""

    req: CompletionRequest | ChatRequest
    grant: Grant
    prompt_ids: list[int]
    max_tokens: int


def authenticate(request: Request, state: ServerState) -> Caller:
    """The caller of this request, or APIError 401 (the gate's answer)."""
    try:
        return state.gate.authenticate(request.headers.get("authorization"))
    except GateError as err:
        raise APIError.from_gate(err) from None


async def generate(request: Request, state: ServerState, endpoint: str) -> Response:
    """Serve one request of `endpoint` ("completions" or "chat")."""
    started = time.monotonic()
    admitted = await _admit(request, state, endpoint)
    req, alpha = admitted.req, admitted.grant.alpha
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(admitted.prompt_ids, admitted.max_tokens, SamplingParams(req.temperature, req.top_p, req.seed),
              req.stop_list(), alpha, event_sink(loop, events))
    _submit(state, job, endpoint)
    reply = Reply(ID_PREFIXES[endpoint] + uuid.uuid4().hex[:24], state.model_name, endpoint, alpha)
    log.info("request %s %s key=%s alpha=%g prompt_tokens=%d max_tokens=%d stream=%s", reply.rid, endpoint,
             admitted.grant.key_name, alpha, len(job.prompt_ids), job.max_tokens, req.stream)
    finished = Finisher(state, job, reply, started)
    headers = {"X-Libortho-Alpha": format(alpha, "g")}
    if req.stream:
        chunks = stream(events, reply, req.include_usage(), finished)
        return EventStream(chunks, finished, media_type="text/event-stream", headers=headers)
    return await _answer_at_once(events, reply, finished, headers)


async def _admit(request: Request, state: ServerState, endpoint: str) -> Admitted:
    """The checked request, or APIError (counted in the metrics)."""
    grant = None
    try:
        if state.draining:
            raise APIError(503, "the server is shutting down; retry on another instance", "server_error",
                           code="shutting_down")
        caller = authenticate(request, state)
        req = _parse(await request.body(), endpoint)
        grant = _grant(request, state, caller, req.alpha)
        _check_model(req.model, state.model_name)
        prompt_ids = _prompt_ids(req, endpoint, state)
        return Admitted(req, grant, prompt_ids, _max_tokens(req, endpoint, len(prompt_ids), state.engine.context_len))
    except APIError as err:
        state.metrics.request_done(grant.alpha if grant is not None else None, endpoint, err.status)
        raise


def _parse(raw: bytes, endpoint: str) -> CompletionRequest | ChatRequest:
    try:
        req, _ignored = parse_body(raw, BODIES[endpoint])
    except RequestError as err:
        raise APIError(400, err.message, param=err.param) from None
    return req


def _grant(request: Request, state: ServerState, caller: Caller, body_alpha: float | None) -> Grant:
    try:
        return state.gate.grant(caller, request.headers.get(ALPHA_HEADER), body_alpha)
    except GateError as err:
        raise APIError.from_gate(err, param="alpha") from None


def _check_model(asked: str, served: str) -> None:
    if asked != served:
        raise APIError(404, f"the model {asked!r} does not exist; this server serves {served!r}",
                       "not_found_error", "model", "model_not_found")


def _prompt_ids(req: CompletionRequest | ChatRequest, endpoint: str, state: ServerState) -> list[int]:
    """The prompt's token ids (chat: through the tokenizer's chat template); APIError 400 if it is
    empty or fills the whole context."""
    tokenizer, context_len = state.engine.tokenizer, state.engine.context_len
    if endpoint == "completions":
        ids = tokenizer(req.prompt_text())["input_ids"]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model {state.model_name!r} has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt" if endpoint == "completions" else "messages")
    if len(ids) >= context_len:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds {context_len} "
                            "(prompt plus completion)", param="prompt", code="context_length_exceeded")
    return list(ids)


def _max_tokens(req: CompletionRequest | ChatRequest, endpoint: str, prompt_len: int, context_len: int) -> int:
    """How many tokens to generate at most (all lengths in tokens); APIError 400 if the asked
    number does not fit the context after the prompt."""
    room = context_len - prompt_len
    asked = req.max_tokens if endpoint == "completions" else req.token_limit()
    if asked is None:
        return min(DEFAULT_COMPLETION_TOKENS, room) if endpoint == "completions" else room
    if asked > room:
        raise APIError(400, f"max_tokens {asked} is too large: the prompt has {prompt_len} tokens and the context "
                            f"holds {context_len}, so at most {room} can be generated",
                       param="max_tokens", code="context_length_exceeded")
    return asked


def _submit(state: ServerState, job: Job, endpoint: str) -> None:
    """Queue the job, or APIError 429 (queue full) / 503 (shutting down), counted in the metrics."""
    try:
        state.engine.submit(job)
    except QueueFull as err:
        state.metrics.request_done(job.alpha, endpoint, 429)
        raise APIError(429, f"too many requests waiting: {err}; retry later", "rate_limit_error",
                       code="queue_full") from None
    except EngineStopped as err:
        state.metrics.request_done(job.alpha, endpoint, 503)
        raise APIError(503, str(err), "server_error", code="shutting_down") from None


async def _answer_at_once(events: asyncio.Queue[Event], reply: Reply, finished: Finisher,
                          headers: dict[str, str]) -> JSONResponse:
    done: Event | None = None
    try:
        text, done = await collect(events)
    finally:  # done stays None if the handler was cancelled (client gone)
        finished(done)
    if done.kind == "error":
        raise APIError(500, done.message, "server_error")
    return JSONResponse(reply.full_body(text, done), headers=headers)
