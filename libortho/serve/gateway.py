"""Gateway mode (`libortho serve --upstream URL`): libortho's door in front of another engine.

Everything at the door stays libortho's: the API keys (401), the alpha gate (400 / 403), the
request limits (413 / 400), the queue bound (429), the drain (503) and the metrics. No model runs
here: an admitted request is forwarded to an OpenAI-compatible engine (such as vLLM serving the
`libortho export --lora` base with its adapter registered), which serves two alphas only:

  * alpha 0 -> the upstream's base model (`upstream_model`);
  * alpha 1 -> the upstream's LoRA adapter (`upstream_adapter`; without one, alpha 1 is 403);
  * 0 < alpha < 1 -> 400: an engine holding a LoRA adapter runs it whole or not at all.

The body goes on as the client sent it, with `model` rewritten and libortho's own field (`alpha`)
removed, so every field the upstream supports works (the upstream validates them). Its answer comes
back as it is, streamed or not; an upstream error answer becomes 502, an unreachable upstream 502,
a slow one 504, each with a one-line message naming the upstream.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .app import create_app
from .config import ServeConfig
from .errors import APIError, error_body, one_line
from .gate import ALPHA_HEADER, AlphaGate, GateError, Grant, shown
from .generation import check_model, open_request
from .keys import KeyStore
from .keywatch import KeysWatcher, signature
from .metrics import Metrics
from .responses import sse
from .schema import RequestError, parse_object
from .state import ServerState
from .streaming import CLIENT_GONE

log = logging.getLogger("libortho.serve")

UPSTREAM_PATHS = {"completions": "/completions", "chat": "/chat/completions"}  # endpoint -> path under the base
OWN_FIELDS = ("alpha",)  # libortho's fields: the upstream knows nothing of them
CONNECT_TIMEOUT_S = 10.0  # an upstream that takes longer to accept a connection is as good as down
MESSAGE_CHARS = 300  # how much of an upstream's error message a 502 repeats


class Gateway:
    """The forwarder of one app. It stands where the engine stands in ServerState (start, stop,
    idle, queued, active, metrics), so the drain, /health and /metrics work unchanged."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.base = config.upstream_base
        self.metrics = Metrics()
        self.active = 0  # requests forwarded and not yet answered in full
        self.client: httpx.AsyncClient | None = None
        self.metrics.gauges["libortho_upstream_in_flight"] = lambda: self.active

    @property
    def queued(self) -> int:
        return 0  # nothing waits here: the upstream queues

    def start(self) -> None:
        """Open the HTTP client (in the app's lifespan, so it belongs to the serving event loop)."""
        timeout = httpx.Timeout(self.config.upstream_timeout_s,
                                connect=min(CONNECT_TIMEOUT_S, self.config.upstream_timeout_s))
        # as many connections as requests may be in flight: none waits for a connection of another
        limits = httpx.Limits(max_connections=self.config.max_queue, max_keepalive_connections=32)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)

    def stop(self) -> None:
        """Nothing to stop in a thread; the client is closed by `aclose`."""

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def idle(self) -> bool:
        return self.active == 0

    def upstream_model(self, alpha: float) -> str:
        """The upstream's model name for a granted alpha (0 or 1, checked by `_admit`)."""
        if alpha == 1.0:
            assert self.config.upstream_adapter is not None  # the gate's ceiling is 0 without an adapter
            return self.config.upstream_adapter
        return self.config.upstream_model or self.config.model_name

    async def forward(self, request: Request, state: ServerState, endpoint: str) -> Response:
        """Serve one request of `endpoint` ("completions" or "chat") through the upstream."""
        started = time.monotonic()
        body, grant = await self._admit(request, state, endpoint)
        name = self.upstream_model(grant.alpha)
        payload = {**{k: v for k, v in body.items() if k not in OWN_FIELDS}, "model": name}
        url = self.base + UPSTREAM_PATHS[endpoint]
        done = _Done(self, state, grant.alpha, endpoint, started)
        log.info("forward %s key=%s alpha=%s upstream_model=%s stream=%s", endpoint, grant.key_name,
                 shown(grant.alpha), name, payload.get("stream") is True)
        headers = {"X-Libortho-Alpha": shown(grant.alpha)}
        try:
            upstream = await self._send(url, payload)
            if not upstream.is_success:
                await upstream.aread()
                await upstream.aclose()
                raise APIError(502, f"the upstream {self.base} answered {upstream.status_code}: "
                                    f"{_upstream_message(upstream)}", "server_error", code="upstream_error")
        except APIError as err:
            done(err.status)
            raise
        except asyncio.CancelledError:
            done(CLIENT_GONE)  # cancelled while waiting: the client went away
            raise
        except Exception:
            done(500)  # a bug: the error handler answers 500
            raise
        if "text/event-stream" in upstream.headers.get("content-type", ""):
            return _Relay(upstream, self.base, done, headers=headers, media_type="text/event-stream")
        return await self._answer(upstream, done, headers)

    async def _admit(self, request: Request, state: ServerState, endpoint: str) -> tuple[dict, Grant]:
        """(the body as a JSON object, the grant), or APIError (counted in the metrics)."""
        grant = None
        try:
            caller, raw = await open_request(request, state)
            body = await asyncio.to_thread(_parse, raw, state.config)
            try:
                grant = state.gate.grant(caller, request.headers.get(ALPHA_HEADER), body.get("alpha"))
            except GateError as err:
                raise APIError.from_gate(err, param="alpha") from None
            if grant.alpha not in (0.0, 1.0):
                raise APIError(400, f"alpha {shown(grant.alpha)} refused: this server forwards to an upstream engine, "
                                    "which serves only alpha 0 (the base) and 1 (the adapter)", param="alpha",
                               code="invalid_alpha")
            _check_model(body.get("model"), state.model_name)
            if self.active >= state.config.max_queue:
                raise APIError(429, f"too many requests in flight ({self.active}, the most this server forwards "
                                    "at once); retry later", "rate_limit_error", code="queue_full")
            return body, grant
        except APIError as err:
            state.metrics.request_done(grant.alpha if grant is not None else None, endpoint, err.status)
            raise

    async def _send(self, url: str, payload: dict) -> httpx.Response:
        """The upstream's response, its body not yet read; APIError 502 / 504 when it cannot be had."""
        if self.client is None:
            raise APIError(503, "the server is not running (its upstream client is closed)", "server_error")
        try:
            return await self.client.send(self.client.build_request("POST", url, json=payload), stream=True)
        except httpx.TimeoutException:
            raise APIError(504, f"the upstream {self.base} did not answer within {self.config.upstream_timeout_s:g} s",
                           "server_error", code="upstream_timeout") from None
        except httpx.HTTPError as err:
            raise APIError(502, f"cannot reach the upstream {self.base}: {type(err).__name__}"
                                f"{': ' + one_line(err) if str(err) else ''}", "server_error",
                           code="upstream_unreachable") from None

    async def _answer(self, upstream: httpx.Response, done: _Done, headers: dict[str, str]) -> Response:
        """The upstream's whole JSON answer, passed on with its status."""
        status = 502
        try:
            try:
                await upstream.aread()
            except httpx.HTTPError as err:
                raise APIError(502, f"the upstream {self.base} broke off its answer: {type(err).__name__}",
                               "server_error", code="upstream_error") from None
            finally:
                await upstream.aclose()
            try:
                answer = upstream.json()
            except ValueError:
                raise APIError(502, f"the upstream {self.base} answered {upstream.status_code} with a body that is "
                                    "not JSON", "server_error", code="upstream_error") from None
            status = upstream.status_code
            usage = answer.get("usage") if isinstance(answer, dict) else None
            done.tokens(usage if isinstance(usage, dict) else {})
            return JSONResponse(answer, status_code=status, headers=headers)
        finally:
            done(status)


class _Done:
    """How a forwarded request ended, recorded once: the in-flight counts and the metrics."""

    def __init__(self, gateway: Gateway, state: ServerState, alpha: float, endpoint: str, started: float) -> None:
        self.gateway, self.state, self.alpha, self.endpoint, self.started = gateway, state, alpha, endpoint, started
        self.prompt_tokens = self.completion_tokens = 0
        self.recorded = False
        gateway.active += 1
        state.in_flight += 1

    def tokens(self, usage: dict) -> None:
        """Take the token counts of the upstream's `usage`, where it gives whole numbers."""
        for field in ("prompt_tokens", "completion_tokens"):
            value = usage.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(self, field, value)

    def __call__(self, status: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        self.gateway.active -= 1
        self.state.in_flight -= 1
        latency = time.monotonic() - self.started
        self.state.metrics.request_done(self.alpha, self.endpoint, status, latency, self.prompt_tokens,
                                        self.completion_tokens)
        log.info("done forward alpha=%s status=%d latency=%.3fs", shown(self.alpha), status, latency)


class _Relay(StreamingResponse):
    """The upstream's server-sent events, passed on as they come. A break in the upstream's stream
    ends the client's with an error event (the status, 200, is sent already); a client that goes
    away closes the upstream's stream, so the engine stops generating for it."""

    def __init__(self, upstream: httpx.Response, base: str, done: _Done, **kwargs) -> None:
        self._upstream, self._base, self._done = upstream, base, done
        self._status = CLIENT_GONE  # until the upstream's stream ends in full
        super().__init__(self._events(), **kwargs)

    async def _events(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._upstream.aiter_raw():
                yield chunk
            self._status = 200
        except httpx.HTTPError as err:
            self._status = 502
            message = f"the upstream {self._base} broke off the stream: {type(err).__name__}"
            yield sse(error_body(message, "server_error", code="upstream_error")).encode()

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when the generator never started (a client gone before the first byte)
            await self._upstream.aclose()
            self._done(self._status)


def _parse(raw: bytes, limits: ServeConfig) -> dict:
    try:
        return parse_object(raw, limits)
    except RequestError as err:
        raise APIError(400, err.message, param=err.param) from None


def _check_model(asked: object, served: str) -> None:
    if not isinstance(asked, str):  # the body is forwarded unparsed, so nothing has checked its type yet
        raise APIError(400, "the request body needs 'model', a string", param="model")
    check_model(asked, served)


def _upstream_message(upstream: httpx.Response) -> str:
    """The upstream's error message on one line (OpenAI's error shape, FastAPI's `detail`, or the
    text), cut to MESSAGE_CHARS."""
    try:
        body = upstream.json()
    except ValueError:
        body = None
    message: object = upstream.text
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message", error) if isinstance(error, dict) else error or body.get("detail") or body
    text = one_line(str(message)) or "(no message)"
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + "..."


def build_gateway(config: ServeConfig) -> FastAPI:
    """The app of a gateway to `config.upstream`, not yet running; its ServerState is `state_of(app)`."""
    keys, seen = None, None
    if config.keys_path is not None:
        seen = signature(Path(config.keys_path))  # before reading: a change while starting is then picked up
        keys = KeyStore.load(config.keys_path)
    named = replace(config, model_name=config.served_model_name)
    if config.upstream_adapter is not None:
        gate = AlphaGate(keys, 1.0)
    else:
        gate = AlphaGate(keys, 0.0, "this gateway has no adapter configured (--upstream-adapter)")
    gateway = Gateway(named)
    state = ServerState(gateway, gate, named, gateway=gateway)
    if config.keys_path is not None:
        state.keys_watcher = KeysWatcher(config.keys_path, gate, config.keys_poll_s, seen)
    log.info("gateway to %s: alpha 0 -> %s, alpha 1 -> %s", gateway.base, gateway.upstream_model(0.0),
             config.upstream_adapter or "refused (no --upstream-adapter)")
    return create_app(state)
