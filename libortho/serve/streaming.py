"""A submitted request's way back to its client: the engine's events, collected into one body or
streamed as server-sent events, and the bookkeeping of how the request ended (exactly once, also
when the client went away)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from .engine import Event, Job
from .errors import error_body
from .gate import shown
from .responses import SSE_DONE, Reply, sse, usage
from .state import ServerState

log = logging.getLogger("libortho.serve")

# nginx's status for a client that closed the connection before the answer was complete
CLIENT_GONE = 499


def event_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A Job sink that hands the engine thread's events to the request's event loop."""

    def sink(event: Event) -> None:  # called from the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    return sink


class Finisher:
    """A request in flight, from its creation until it is called, once: then it records the end
    (metrics, log, in-flight count) and cancels the job (a no-op if the job finished; stops its
    generation if the client went away)."""

    def __init__(self, state: ServerState, job: Job, reply: Reply, started: float) -> None:
        """`started`: time.monotonic() when the request arrived."""
        self.state, self.job, self.reply, self.started = state, job, reply, started
        self.done = False
        state.in_flight += 1

    def __call__(self, event: Event | None) -> None:
        """`event`: the job's last event, None if the client went away before it."""
        if self.done:
            return
        self.done = True
        self.job.cancel()
        self.state.in_flight -= 1
        latency = time.monotonic() - self.started
        status, finish, tokens = _outcome(event)
        self.state.metrics.request_done(self.reply.alpha, self.reply.endpoint, status, latency,
                                        len(self.job.prompt_ids), tokens)
        log.info("done %s alpha=%s status=%d finish=%s completion_tokens=%d latency=%.3fs", self.reply.rid,
                 shown(self.reply.alpha), status, finish, tokens, latency)


def _outcome(event: Event | None) -> tuple[int, str, int]:
    """(HTTP status, finish reason, completion tokens) of a request whose last event was `event`."""
    if event is None:
        return CLIENT_GONE, "client_disconnected", 0
    if event.kind == "error":
        return 500, "error", 0
    return 200, event.finish_reason, event.completion_tokens


async def collect(events: asyncio.Queue[Event]) -> tuple[str, Event]:
    """(all the text, the last event) of a job."""
    parts = []
    while True:
        event = await events.get()
        if event.kind != "text":
            return "".join(parts), event
        parts.append(event.text)


async def stream(events: asyncio.Queue[Event], reply: Reply, include_usage: bool,
                 finished: Finisher) -> AsyncIterator[str]:
    """A job's events as OpenAI's server-sent events, ending with [DONE]."""
    done: Event | None = None
    try:
        if reply.endpoint == "chat":  # OpenAI's first chat chunk carries the role
            yield sse(reply.chunk({"role": "assistant", "content": ""}))
        while (event := await events.get()).kind == "text":
            yield sse(reply.chunk(event.text))
        done = event
        for body in _closing_chunks(done, reply, include_usage):
            yield sse(body)
        yield SSE_DONE
    finally:  # also on client disconnect (the response task is cancelled or its send fails)
        finished(done)


def _closing_chunks(done: Event, reply: Reply, include_usage: bool) -> list[dict]:
    """The chunks after the last text: an error, or the finish reason (and usage when asked for)."""
    if done.kind == "error":
        return [error_body(done.message, "server_error")]
    last = reply.chunk({} if reply.endpoint == "chat" else "", done.finish_reason)
    if not include_usage:
        return [last]
    last["usage"] = None  # OpenAI: every chunk but the usage chunk carries "usage": null
    counts = reply.chunk(None)
    counts["choices"], counts["usage"] = [], usage(done)
    return [last, counts]


class EventStream(StreamingResponse):
    """A StreamingResponse that records the request's end even if its generator never started
    (a client gone before the first byte): an unstarted generator's `finally` never runs."""

    def __init__(self, content: AsyncIterator[str], finisher: Finisher, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._finisher = finisher

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._finisher(None)  # a no-op when the stream already recorded how it ended
