"""The HTTP API (FastAPI): OpenAI's /v1/completions, /v1/chat/completions (streamed as server-sent
events or not) and /v1/models, plus /health and /metrics.

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
never a traceback. The alpha a request was served at is echoed in `system_fingerprint`
("libortho:alpha=A") and in the `X-Libortho-Alpha` response header, and logged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStopped, Event, Job, QueueFull
from .gate import ALPHA_HEADER, AlphaGate, GateError
from .sampling import SamplingParams
from .schema import ChatRequest, CompletionRequest, RequestError, parse_body

log = logging.getLogger("libortho.serve")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class APIError(Exception):
    """An error answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ServerState:
    """Shared between the app and the process runner: draining after SIGTERM, requests in flight."""

    draining: bool = False
    in_flight: int = 0


def fingerprint(alpha: float) -> str:
    return f"libortho:alpha={alpha:g}"


def create_app(engine: Engine, gate: AlphaGate, model_name: str, state: ServerState | None = None) -> FastAPI:
    """The ASGI app serving `engine`'s model as `model_name`. The engine is started and stopped
    with the app's lifespan."""
    state = state or ServerState()
    tokenizer, metrics = engine.tokenizer, engine.metrics
    created = int(time.time())

    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        # uvicorn calls this after the last connection closed: nothing is left to serve
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="libortho serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), type_)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")

    # ---- plain endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "draining" if state.draining else "ok", "model": model_name,
                "max_alpha": gate.servable_max, "queued": engine.queued, "active": engine.active}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authenticate(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "libortho"}]})

    # ---- generation ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, CompletionRequest, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, ChatRequest, "chat")

    def _authenticate(request: Request) -> None:
        try:
            gate.authenticate(request.headers.get("authorization"))
        except GateError as err:
            raise APIError(err.status, err.message, err.type, code=err.code) from None

    async def _generate(request: Request, cls: type, endpoint: str) -> Response:
        t0 = time.monotonic()
        alpha = None
        try:
            if state.draining:
                raise APIError(503, "the server is shutting down; retry on another instance", "server_error",
                               code="shutting_down")
            _authenticate(request)
            try:
                req, _ignored = parse_body(await request.body(), cls)
            except RequestError as err:
                raise APIError(400, err.message, param=err.param) from None
            try:
                grant = gate.grant(request.headers.get("authorization"), request.headers.get(ALPHA_HEADER), req.alpha)
            except GateError as err:
                raise APIError(err.status, err.message, err.type, param="alpha", code=err.code) from None
            alpha = grant.alpha
            if req.model != model_name:
                raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                               "not_found_error", "model", "model_not_found")
            prompt_ids = _prompt_ids(req, endpoint)
            max_tokens = _max_tokens(req, endpoint, len(prompt_ids))
        except APIError as err:
            metrics.request_done(alpha, endpoint, err.status)
            raise

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

        job = Job(prompt_ids, max_tokens, SamplingParams(req.temperature, req.top_p, req.seed), req.stop_list(),
                  alpha, sink)
        try:
            engine.submit(job)
        except QueueFull as err:
            metrics.request_done(alpha, endpoint, 429)
            raise APIError(429, f"too many requests waiting: {err}; retry later", "rate_limit_error",
                           code="queue_full") from None
        except EngineStopped as err:
            metrics.request_done(alpha, endpoint, 503)
            raise APIError(503, str(err), "server_error", code="shutting_down") from None

        rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        headers = {"X-Libortho-Alpha": format(alpha, "g")}
        log.info("request %s %s key=%s alpha=%g prompt_tokens=%d max_tokens=%d stream=%s", rid, endpoint,
                 grant.key_name, alpha, len(prompt_ids), max_tokens, req.stream)
        state.in_flight += 1
        finished = _Finisher(state, metrics, job, rid, endpoint, alpha, t0, len(prompt_ids))
        if req.stream:
            chunks = _stream(events, rid, endpoint, alpha, req.include_usage(), finished)
            return _EventStream(chunks, finished, media_type="text/event-stream", headers=headers)
        done: Event | None = None
        try:
            text, done = await _collect(events)
        finally:  # done stays None if the handler was cancelled (client gone)
            finished(done)
        if done.kind == "error":
            raise APIError(500, done.message, "server_error")
        return JSONResponse(_full_body(rid, model_name, endpoint, alpha, text, done), headers=headers)

    async def _collect(events: asyncio.Queue[Event]) -> tuple[str, Event]:
        parts = []
        while True:
            event = await events.get()
            if event.kind == "text":
                parts.append(event.text)
            else:
                return "".join(parts), event

    async def _stream(events: asyncio.Queue[Event], rid: str, endpoint: str, alpha: float, include_usage: bool,
                      finished: "_Finisher") -> AsyncIterator[str]:
        done: Event | None = None
        try:
            if endpoint == "chat":  # OpenAI's first chat chunk carries the role
                yield _sse(_chunk(rid, model_name, endpoint, alpha, {"role": "assistant", "content": ""}, None))
            while True:
                event = await events.get()
                if event.kind == "text":
                    yield _sse(_chunk(rid, model_name, endpoint, alpha, event.text, None))
                    continue
                done = event
                if event.kind == "error":
                    yield _sse({"error": {"message": event.message, "type": "server_error", "param": None,
                                          "code": None}})
                    break
                body = _chunk(rid, model_name, endpoint, alpha, {} if endpoint == "chat" else "", event.finish_reason)
                if include_usage:
                    body["usage"] = None
                yield _sse(body)
                if include_usage:
                    usage = _chunk(rid, model_name, endpoint, alpha, None, None)
                    usage["choices"], usage["usage"] = [], _usage(event)
                    yield _sse(usage)
                break
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (the response task is cancelled or its send fails)
            finished(done)

    def _prompt_ids(req, endpoint: str) -> list[int]:
        if endpoint == "completions":
            ids = tokenizer(req.prompt_text())["input_ids"]
        else:
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, f"the model {model_name!r} has no chat template; use /v1/completions",
                               param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt" if endpoint == "completions" else "messages")
        if len(ids) >= engine.context_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds {engine.context_len} "
                                "(prompt plus completion)", param="prompt", code="context_length_exceeded")
        return list(ids)

    def _max_tokens(req, endpoint: str, prompt_len: int) -> int:
        room = engine.context_len - prompt_len
        asked = req.max_tokens if endpoint == "completions" else req.token_limit()
        if asked is None:
            return min(DEFAULT_COMPLETION_TOKENS, room) if endpoint == "completions" else room
        if asked > room:
            raise APIError(400, f"max_tokens {asked} is too large: the prompt has {prompt_len} tokens and the context "
                                f"holds {engine.context_len}, so at most {room} can be generated",
                           param="max_tokens", code="context_length_exceeded")
        return asked

    return app


class _EventStream(StreamingResponse):
    """A StreamingResponse that records the request's end even if its generator never started
    (a client gone before the first byte): an unstarted generator's `finally` never runs."""

    def __init__(self, content, finisher: "_Finisher", **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._finisher = finisher

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finisher(None)  # a no-op when the stream already recorded how it ended


class _Finisher:
    """Records a request's end exactly once: metrics, log, in-flight count, and cancels the job
    (a no-op if it finished; stops its generation if the client went away)."""

    def __init__(self, state: ServerState, metrics, job: Job, rid: str, endpoint: str, alpha: float, t0: float,
                 prompt_tokens: int) -> None:
        self.state, self.metrics, self.job, self.rid, self.endpoint = state, metrics, job, rid, endpoint
        self.alpha, self.t0, self.prompt_tokens, self.done = alpha, t0, prompt_tokens, False

    def __call__(self, event: Event | None) -> None:
        if self.done:
            return
        self.done = True
        self.job.cancel()
        self.state.in_flight -= 1
        latency = time.monotonic() - self.t0
        if event is None:
            status, finish, tokens = 499, "client_disconnected", 0  # nginx's code for a client that left
        elif event.kind == "error":
            status, finish, tokens = 500, "error", 0
        else:
            status, finish, tokens = 200, event.finish_reason, event.completion_tokens
        self.metrics.request_done(self.alpha, self.endpoint, status, latency, self.prompt_tokens, tokens)
        log.info("done %s alpha=%g status=%d finish=%s completion_tokens=%d latency=%.3fs", self.rid, self.alpha,
                 status, finish, tokens, latency)


def _usage(event: Event) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _full_body(rid: str, model: str, endpoint: str, alpha: float, text: str, done: Event) -> dict:
    if endpoint == "completions":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        kind = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
        kind = "chat.completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint(alpha), "choices": [choice], "usage": _usage(done)}


def _chunk(rid: str, model: str, endpoint: str, alpha: float, content, finish_reason: str | None) -> dict:
    if endpoint == "completions":
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        kind = "text_completion"
    else:
        delta = content if isinstance(content, dict) else ({} if content is None else {"content": content})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        kind = "chat.completion.chunk"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint(alpha), "choices": [choice]}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
