"""The batching engine: one worker thread owns the model and decodes every active request as one
batch, one alpha per row.

Scheduling, one iteration of the worker:
  * admission: when idle, the first request waits up to `config.max_wait_ms` for others; up to
    `config.max_batch` rows run at once (resolved by device, see ServeConfig), and waiting
    requests join at every step boundary while others run (continuous batching);
  * prefill: the prompts of rows that joined are read, chunked (`config.prefill_chunk` tokens per
    iteration over all rows) so that a long prompt does not stall the rows already streaming;
  * decode: every row whose prompt is read gets its next token; finished and cancelled rows leave
    at once;
  * back-pressure: at most `config.max_queue` requests wait for admission; beyond that `submit`
    raises QueueFull (HTTP 429).

The model side is a runner. Llama-architecture models run on a preallocated slot cache
(slot_runner: each request owns a slot; on CUDA the decode step replays a CUDA graph); other
models on a left-padded batch (kvbatch.BatchRunner), where rows join only if its cache allows
(`joinable`) and otherwise wait until the running batch is empty. The choice is made when the
engine is built and logged.

Every forward runs with an explicit per-row alpha (the runners scope the model's switch to it,
or write it into the graph's alpha buffer), so no request depends on a model-wide default alpha.
A forward that raises fails the rows it ran; a row whose logits cannot be sampled fails alone.

Accounting: each iteration's seconds per phase (admit, prefill, decode, sample, tokens, release)
and every step's way of running (graph replay, eager, capture) go to `metrics.engine`
(engine_stats.EngineStats, also on /metrics); at debug log level each iteration is logged too.
On a GPU with graphs, the worker first captures the graphs of the common step shapes
(`config.graph_warmup`), so that no request waits for a capture.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..hf_model import pad_token_id
from .config import ServeConfig
from .kvbatch import BatchRunner
from .llama_step import unsupported_reason
from .metrics import Metrics
from .sampling import RowFailed, SamplingParams, sample
from .slot_runner import SlotRunner
from .text import TextStream, decoder_of

log = logging.getLogger("libortho.serve")


class QueueFull(Exception):
    """More requests wait than the queue holds."""


class EngineStopped(Exception):
    """The engine no longer accepts requests (shutting down)."""


@dataclass
class Event:
    """What the worker tells a request: a text delta, the end ('done'), or an error."""

    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" (with kind == "done")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


@dataclass
class Job:
    """One generation request as the engine sees it. `sink` is called from the worker thread."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    alpha: float
    sink: Callable[[Event], None]
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client is gone: the row leaves the batch at the next step boundary."""
        self.cancelled.set()


@dataclass
class _Row:
    job: Job
    text: TextStream
    next_token: int = -1  # sampled, not yet fed to the model
    generated: int = 0
    first_token_at: float | None = None
    finished: bool = False
    slot: int = -1  # the slot-cache slot it owns (slot runner), -1 for none
    prefilled: int = 0  # prompt tokens already in the cache

    @property
    def decoding(self) -> bool:
        """Prompt read and a token sampled: the row takes part in decode steps."""
        return not self.finished and self.prefilled == len(self.job.prompt_ids) and self.generated > 0


class Engine:
    """Owns the model; `submit` jobs from any thread, events come back through each job's sink."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or ServeConfig()
        self.metrics = metrics or Metrics()
        # a model config without a context length is rare (old or custom models); 2048 is the common size
        context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.context_len = min(context, self.config.max_context or context)
        self.max_batch = self.config.resolved_max_batch
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self._decode = decoder_of(tokenizer)
        self.runner = self._make_runner()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._clock = _Clock()  # the running iteration's (the worker's)
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="libortho-engine", daemon=True)
        self.metrics.gauges["libortho_queue_depth"] = lambda: len(self._pending)
        self.metrics.gauges["libortho_active_rows"] = lambda: len(self._rows)

    def _make_runner(self) -> SlotRunner | BatchRunner:
        """The slot cache where the model allows it, else the padded batch (decided here, once)."""
        reason = unsupported_reason(self.model, self.context_len) if self.config.slot_cache else "slot_cache is off"
        if reason is None:
            runner = SlotRunner(self.model, self.config, self.context_len, self.metrics.engine)
            log.info("engine: slot cache, %d slots of %d tokens, decode %s", self.max_batch, self.context_len,
                     "in CUDA graphs" if runner.graphs is not None else "eager")
            return runner
        log.info("engine: padded batch (%s)", reason)
        return BatchRunner(self.model, self.pad_id, self.metrics.engine)

    # ---- the HTTP side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._pending) >= self.config.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting "
                                f"(--max-queue {self.config.max_queue})")
            self._pending.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._rows)

    def stats(self) -> dict:
        """The engine's counters (engine_stats.EngineStats.snapshot), with the captured graph
        buckets and those that run eagerly because their capture failed."""
        out = self.metrics.engine.snapshot()
        graphs = getattr(self.runner, "graphs", None)
        out["graphs"] = [list(k) for k in graphs.captured] if graphs is not None else []
        out["graphs_failed"] = [list(k) for k in graphs.failed] if graphs is not None else []
        return out

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._rows

    def stop(self) -> None:
        """Refuse new jobs, let the queued and running ones finish (up to `config.stop_timeout_s`
        seconds), stop the worker."""
        with self._cond:
            self._accepting = False
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(self.config.stop_timeout_s)

    # ---- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.config.graph_warmup and isinstance(self.runner, SlotRunner):
            try:
                self.runner.warm_up()
            except Exception:  # the steps are captured when first needed instead
                log.exception("graph warm-up failed")
        while True:
            admitted = self._wait_for_work()
            if admitted is None:
                return
            clock = self._clock = _Clock()
            try:
                self._admit(admitted)
                clock.lap("admit")
                self._prefill_step()
                self._drop_finished_rows()
                clock.lap("release")
                if any(r.decoding for r in self._rows):
                    self._decode_step()
                self._drop_finished_rows()
                clock.lap("release")
            except Exception as err:  # a bug outside the forwards must not kill the server either
                log.exception("engine step failed")
                self._fail_everything(err)
            self.metrics.engine.iteration(clock.phases)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("iteration: %d rows, %s", len(self._rows),
                          " ".join(f"{name} {1e3 * t:.2f} ms" for name, t in clock.phases.items()))

    def _wait_for_work(self) -> list[Job] | None:
        """Jobs to admit now (possibly none while rows run); None when the worker should exit."""
        with self._cond:
            while not self._pending and not self._rows:
                if self._stop:
                    return None
                self._cond.wait()
            if not self._rows:
                # idle: give companions up to max_wait to arrive, so they share the prefill
                deadline = self._pending[0].enqueued_at + self.config.max_wait_ms / 1000.0
                while len(self._pending) < self.max_batch and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            elif not self.runner.joinable:
                return []  # rows cannot join this cache: the batch runs out first
            room = self.max_batch - len(self._rows)
            admitted = []
            while self._pending and len(admitted) < room:
                job = self._pending.popleft()
                if not job.cancelled.is_set():
                    admitted.append(job)
            return admitted

    def _admit(self, jobs: list[Job]) -> None:
        """New rows for the jobs (their prompts are read by the next prefill steps)."""
        for job in jobs:
            if not job.prompt_ids:  # the HTTP side refuses these; a direct caller gets the same answer
                job.sink(Event("error", message="the prompt is empty"))
                continue
            row = _Row(job, TextStream(self.tokenizer, job.stops, self._decode))
            self.runner.admit(row)
            self._rows.append(row)

    def _prefill_step(self) -> None:
        """Read the next chunk of waiting prompts; sample the first token of each prompt finished.
        All of it, sampling and text included, is the iteration's "prefill" phase."""
        waiting = [r for r in self._rows if r.prefilled < len(r.job.prompt_ids) and not r.finished
                   and not r.job.cancelled.is_set()]
        if not waiting:
            return
        clock = self._clock
        try:
            rows, logits = self.runner.prefill(waiting)
        except Exception as err:  # e.g. out of memory on a long prompt: those rows fail, running ones go on
            log.exception("prefill failed")
            self._fail_rows(waiting, err)
            clock.lap("prefill")
            return
        if rows:
            self._after_sampling(rows, sample(logits, [r.job.params for r in rows]))
        clock.lap("prefill")

    def _decode_step(self) -> None:
        """Feed every decoding row its last sampled token; sample the next one."""
        rows, clock = [r for r in self._rows if r.decoding], self._clock
        try:
            rows, logits = self.runner.decode(rows)
        except Exception as err:  # a failed forward fails the rows it ran, the server goes on
            log.exception("decode step failed")
            self._fail_rows(rows, err)
            clock.lap("decode")
            return
        clock.lap("decode")
        self.metrics.decode_step([r.job.alpha for r in rows])
        tokens = sample(logits, [r.job.params for r in rows])  # on a GPU: waits for the step (the one sync)
        clock.lap("sample")
        self._after_sampling(rows, tokens)
        clock.lap("tokens")

    def _after_sampling(self, rows: list[_Row], tokens: list[int | RowFailed]) -> None:
        """Hand out text and finish rows that are done. A row that failed (sampling, detokenizing)
        ends with an error; its neighbours go on."""
        now = time.monotonic()
        for row, token in zip(rows, tokens, strict=True):
            if row.job.cancelled.is_set() or row.finished:
                continue
            if isinstance(token, RowFailed):
                self._fail(row, token.reason)
                continue
            try:
                self._take_token(row, token, now)
            except Exception as err:  # e.g. a token the tokenizer cannot decode: this row's trouble only
                self._fail(row, f"decoding failed: {type(err).__name__}: {err}")

    def _fail_everything(self, err: Exception) -> None:
        """After an unexpected error: every row ends with it; the worker goes on with none."""
        for row in self._rows:
            if not row.finished:
                self._fail(row, f"generation failed: {type(err).__name__}: {err}")
        rows, self._rows = self._rows, []
        try:
            self.runner.release(rows)
        except Exception:  # the slots stay taken; the engine still serves with those left
            log.exception("could not free the rows' cache")

    def _fail_rows(self, rows: list[_Row], err: Exception) -> None:
        """End these rows with the error of a forward that raised, and free what they held."""
        message = f"generation failed: {type(err).__name__}: {err}"
        for row in rows:
            if not row.finished:
                self._fail(row, message)
        self._drop_finished_rows()

    def _fail(self, row: _Row, reason: str) -> None:
        """End one row with an error (HTTP 500 for its request); the batch goes on without it."""
        reason = _one_line(reason)
        log.warning("row failed after %d tokens (alpha=%s): %s", row.generated, row.job.alpha, reason)
        row.job.sink(Event("error", message=reason))
        row.finished = True

    def _take_token(self, row: _Row, token: int, now: float) -> None:
        """Record the row's new token (`now`: time.monotonic()); send its text, and its end if it ends."""
        if row.first_token_at is None:
            row.first_token_at = now
            self.metrics.first_token_after(row.job.alpha, now - row.job.enqueued_at)
        row.generated += 1
        row.next_token = token
        if token in self.eos_ids:  # EOS ends the row without text of its own
            self._finish(row, "stop")
            return
        delta = row.text.push(token)
        if delta:
            row.job.sink(Event("text", text=delta))
        if row.text.stopped:
            self._finish(row, "stop")
        elif row.generated >= row.job.max_tokens or len(row.job.prompt_ids) + row.generated >= self.context_len:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str) -> None:
        """Send the text held back for stop matching, then the row's end."""
        tail = row.text.finish()
        if tail:
            row.job.sink(Event("text", text=tail))
        row.job.sink(Event("done", finish_reason=reason, prompt_tokens=len(row.job.prompt_ids),
                           completion_tokens=row.generated))
        row.finished = True

    def _drop_finished_rows(self) -> None:
        """Finished and cancelled rows leave the batch and give back what they held."""
        gone = [r for r in self._rows if r.finished or r.job.cancelled.is_set()]
        if gone:
            self._rows = [r for r in self._rows if not (r.finished or r.job.cancelled.is_set())]
            self.runner.release(gone)


class _Clock:
    """Seconds per phase of one worker iteration: `lap(name)` adds the time since the last lap."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


def _one_line(text: str) -> str:
    """An error message as one line: exception texts (torch's among them) may span several."""
    return " ".join(text.split())


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
