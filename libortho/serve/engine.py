"""The batching engine: one worker thread owns the model and decodes every active request as one
batch, one alpha per row.

Scheduling:
  * dynamic batching: when idle, the first request waits up to `config.max_wait_ms` for others,
    and up to `config.max_batch` rows start together (one left-padded prefill);
  * continuous batching: while a batch runs, waiting requests are prefilled and join it at the
    next step boundary (up to `config.max_batch` rows), and finished rows leave at once. This needs a
    cache whose rows can be padded and concatenated (KVBatch.joinable); otherwise new requests
    wait until the running batch is empty (plain dynamic batching);
  * back-pressure: at most `config.max_queue` requests wait for admission; beyond that `submit` raises
    QueueFull (HTTP 429).

The worker is the only thread that runs the model, and it runs every forward inside an explicit
`libortho.alpha(model, per_row_alphas)` scope (KVBatch._forward), so no request depends on a
model-wide default alpha.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..hf_model import pad_token_id
from .config import ServeConfig
from .kvbatch import KVBatch
from .metrics import Metrics
from .sampling import RowFailed, SamplingParams, sample
from .text import TextStream

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


class Engine:
    """Owns the model; `submit` jobs from any thread, events come back through each job's sink."""

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or ServeConfig()
        self.metrics = metrics or Metrics()
        # a model config without a context length is rare (old or custom models); 2048 is the common size
        self.context_len = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="libortho-engine", daemon=True)
        self.metrics.gauges["libortho_queue_depth"] = lambda: len(self._pending)
        self.metrics.gauges["libortho_active_rows"] = lambda: len(self._rows)

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
        while True:
            admitted = self._wait_for_work()
            if admitted is None:
                return
            try:
                if admitted:
                    self._admit(admitted)
                if self._rows:
                    self._decode_step()
            except Exception as err:  # a failed forward must not kill the server: fail the rows it touched
                log.exception("batch failed")
                running = {id(r.job) for r in self._rows}
                for job in [r.job for r in self._rows] + [j for j in admitted if id(j) not in running]:
                    job.sink(Event("error", message=_one_line(f"generation failed: {type(err).__name__}: {err}")))
                self._rows, self._batch = [], None

    def _wait_for_work(self) -> list[Job] | None:
        """Jobs to admit now (possibly none while a batch runs); None when the worker should exit."""
        with self._cond:
            while not self._pending and not self._rows:
                if self._stop:
                    return None
                self._cond.wait()
            if not self._rows:
                # idle: give companions up to max_wait to arrive, so they share the prefill
                deadline = self._pending[0].enqueued_at + self.config.max_wait_ms / 1000.0
                while len(self._pending) < self.config.max_batch and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            elif self._batch is not None and not self._batch.joinable:
                return []  # rows cannot join this cache: the batch runs out first
            room = self.config.max_batch - len(self._rows)
            admitted = []
            while self._pending and len(admitted) < room:
                job = self._pending.popleft()
                if not job.cancelled.is_set():
                    admitted.append(job)
            return admitted

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs as one batch, sample their first tokens, and join the running batch."""
        alphas = torch.tensor([j.alpha for j in jobs], dtype=torch.float32)
        batch, logits = KVBatch.prefill(self.model, [j.prompt_ids for j in jobs], alphas, self.pad_id)
        rows = [_Row(j, TextStream(self.tokenizer, j.stops)) for j in jobs]
        tokens = sample(logits, [j.params for j in jobs])
        if self._batch is None:
            self._batch, self._rows = batch, rows
            self._after_sampling(list(range(len(rows))), tokens)
            return
        self._batch.merge(batch)
        start = len(self._rows)
        self._rows.extend(rows)
        self._after_sampling(list(range(start, start + len(rows))), tokens)

    def _decode_step(self) -> None:
        """Feed every row its last sampled token; sample the next one."""
        alphas_list = [r.job.alpha for r in self._rows]
        self.metrics.decode_step(alphas_list)
        logits = self._batch.step([r.next_token for r in self._rows], torch.tensor(alphas_list, dtype=torch.float32))
        tokens = sample(logits, [r.job.params for r in self._rows])
        self._after_sampling(list(range(len(self._rows))), tokens)

    def _after_sampling(self, indices: list[int], tokens: list[int | RowFailed]) -> None:
        """Hand out text, finish rows that are done, drop finished and cancelled rows from the batch.
        A row that failed (sampling, detokenizing) ends with an error; its neighbours go on."""
        now = time.monotonic()
        for i, token in zip(indices, tokens):
            row = self._rows[i]
            if row.job.cancelled.is_set() or row.finished:
                continue
            if isinstance(token, RowFailed):
                self._fail(row, token.reason)
                continue
            try:
                self._take_token(row, token, now)
            except Exception as err:  # e.g. a token the tokenizer cannot decode: this row's trouble only
                self._fail(row, f"decoding failed: {type(err).__name__}: {err}")
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
        keep = [i for i, r in enumerate(self._rows) if not (r.finished or r.job.cancelled.is_set())]
        if len(keep) == len(self._rows):
            return
        if keep:
            self._batch.keep(keep)
            self._rows = [self._rows[i] for i in keep]
        else:
            self._rows, self._batch = [], None


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
