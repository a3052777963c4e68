"""One generation request, from HTTP to the engine and back.

In order: refused while draining (503), authenticated (401), its body read up to
`config.max_body_bytes` (413), validated (400), its alpha granted (400 / 403), its model checked
(404), its prompt tokenized and its token budget fitted to the context (400), then submitted (429
when the queue is full) and answered at once or streamed. Every refusal is counted in the metrics,
with the alpha when one was granted.

Parsing and tokenizing run in worker threads, never on the event loop, so one large request does
not stall the others (nor /health). A client that goes away is noticed while it waits, streamed
or not: its job is cancelled and the request counted with status 499.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from .config import ServeConfig
from .engine import EngineStopped, Event, Job, QueueFull
from .errors import APIError
from .gate import ALPHA_HEADER, Caller, GateError, Grant, shown
from .prompts import prompt_ids
from .responses import Reply
from .sampling import SamplingParams
from .schema import ChatRequest, CompletionRequest, RequestError, parse_body
from .state import ServerState
from .streaming import CLIENT_GONE, EventStream, Finisher, collect, event_sink, stream

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
    log.info("request %s %s key=%s alpha=%s prompt_tokens=%d max_tokens=%d stream=%s", reply.rid, endpoint,
             admitted.grant.key_name, shown(alpha), len(job.prompt_ids), job.max_tokens, req.stream)
    finished = Finisher(state, job, reply, started)
    headers = {"X-Libortho-Alpha": shown(alpha)}
    if req.stream:
        chunks = stream(events, reply, req.include_usage(), finished)
        return EventStream(chunks, finished, media_type="text/event-stream", headers=headers)
    return await _answer_at_once(request, events, reply, finished, headers)


async def _admit(request: Request, state: ServerState, endpoint: str) -> Admitted:
    """The checked request, or APIError (counted in the metrics)."""
    grant = None
    try:
        caller, raw = await open_request(request, state)
        req = await asyncio.to_thread(_parse, raw, endpoint, state.config)
        grant = _grant(request, state, caller, req.alpha)
        check_model(req.model, state.model_name)
        engine = state.engine
        ids = await asyncio.to_thread(prompt_ids, req, endpoint, engine.tokenizer, engine.context_len, state.config,
                                      state.chat_problem)
        return Admitted(req, grant, ids, _max_tokens(req, endpoint, len(ids), engine.context_len))
    except APIError as err:
        state.metrics.request_done(grant.alpha if grant is not None else None, endpoint, err.status)
        raise


async def open_request(request: Request, state: ServerState) -> tuple[Caller, bytes]:
    """What every generation request passes first: the server is not draining (503), the key is known (401),
    the body is within the size limit (413). Returns the caller and the raw body."""
    if state.draining:
        raise APIError(503, "the server is shutting down; retry on another instance", "server_error",
                       code="shutting_down")
    caller = authenticate(request, state)
    return caller, await read_body(request, state.config.max_body_bytes)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or APIError 413 as soon as it is known to exceed `limit` bytes: from its
    Content-Length before reading anything, else (chunked) while reading."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):  # 18 digits: no int() of a huge text
        raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(CLIENT_GONE, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes, the most this server reads",
                    param=None, code="request_too_large")


def _parse(raw: bytes, endpoint: str, limits: ServeConfig) -> CompletionRequest | ChatRequest:
    try:
        req, _ignored = parse_body(raw, BODIES[endpoint], limits)
    except RequestError as err:
        raise APIError(400, err.message, param=err.param) from None
    return req


def _grant(request: Request, state: ServerState, caller: Caller, body_alpha: float | None) -> Grant:
    try:
        return state.gate.grant(caller, request.headers.get(ALPHA_HEADER), body_alpha)
    except GateError as err:
        raise APIError.from_gate(err, param="alpha") from None


def check_model(asked: str, served: str) -> None:
    if asked != served:
        raise APIError(404, f"the model {asked!r} does not exist; this server serves {served!r}",
                       "not_found_error", "model", "model_not_found")


def _max_tokens(req: CompletionRequest | ChatRequest, endpoint: str, prompt_len: int, context_len: int) -> int:
    """How many tokens to generate at most (all lengths in tokens); APIError 400 if the asked
    number does not fit the context after the prompt."""
    room = context_len - prompt_len
    asked = req.max_tokens if endpoint == "completions" else req.token_limit()
    if asked is None:
        return min(DEFAULT_COMPLETION_TOKENS, room) if endpoint == "completions" else room
    if asked > room:
        shown_asked = asked if asked < 10**9 else f"of {len(str(asked))} digits"  # a 4000-digit number is no message
        raise APIError(400, f"max_tokens {shown_asked} is too large: the prompt has {prompt_len} tokens and the "
                            f"context holds {context_len}, so at most {room} can be generated",
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


async def _answer_at_once(request: Request, events: asyncio.Queue[Event], reply: Reply, finished: Finisher,
                          headers: dict[str, str]) -> Response:
    answer: tuple[str, Event] | None = None
    try:
        answer = await _until_done_or_gone(request, events)
    finally:  # answer stays None if the client went away (or the handler was cancelled)
        finished(answer[1] if answer is not None else None)
    if answer is None:
        return Response(status_code=CLIENT_GONE)  # nobody reads it: the connection is closed
    text, done = answer
    if done.kind == "error":
        raise APIError(500, done.message, "server_error")
    return JSONResponse(reply.full_body(text, done), headers=headers)


async def _until_done_or_gone(request: Request, events: asyncio.Queue[Event]) -> tuple[str, Event] | None:
    """(all the text, the last event) of the job, or None as soon as the client disconnects."""
    answer = asyncio.ensure_future(collect(events))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        answer.cancel()  # a no-op when it is done
    return answer.result() if answer.done() and not answer.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body was read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
