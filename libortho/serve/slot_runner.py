"""The engine's model side on a slot cache: chunked prefill and decode steps for Llama-architecture
models (LlamaStep over a SlotCache), the decode step in CUDA graphs on a GPU.

  * admit: a new request takes a slot (nothing runs);
  * prefill: advances waiting prompts by up to `config.prefill_chunk` tokens in all (rows in
    admission order, a long prompt in several chunks), so that the engine can run a decode step
    between chunks and running rows keep streaming while a long prompt is read;
  * decode: feeds every decoding row its last sampled token, one row per slot: on CUDA the
    captured graph of the step's (rows, width) bucket, elsewhere the same forward eagerly;
  * release: a finished, failed or cancelled row gives its slot back.

Every forward runs with one alpha per row, checked on the host: eager forwards inside
`alpha_state(model).scoped(alphas)`, moved to the device once per forward (`pin`); graph replays
read the alphas from the graph's static buffer (decode_graphs).

Rows are the engine's: this module reads `job.prompt_ids`, `job.alpha`, `next_token` and
`generated`, and keeps `slot` and `prefilled` (prompt tokens already in the cache) up to date.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Protocol

import torch
from torch import nn

from ..switch import alpha_state
from .config import ServeConfig, ServeConfigError
from .decode_graphs import DecodeGraphs, bucket, graph_problem, width_bucket
from .llama_step import LlamaStep

log = logging.getLogger("libortho.serve")
CUDA_MEMORY_SHARE = 0.8  # the KV cache may take this share of the GPU memory free when the engine starts


class RowState(Protocol):
    """What the runner needs of one of the engine's rows."""

    job: object  # .prompt_ids: list[int], .alpha: float
    slot: int
    prefilled: int
    next_token: int
    generated: int


class SlotRunner:
    """Prefill and decode of the engine's rows on one slot cache. Not thread-safe (one worker)."""

    joinable = True  # rows join and leave at any step boundary

    def __init__(self, model: nn.Module, config: ServeConfig, max_len: int) -> None:
        self.model, self.config = model, config
        self.step = LlamaStep(model, max_len)
        slots = config.resolved_max_batch
        self.device = self.step.device
        if self.device.type == "cuda":
            _check_fits(self.step.cache_bytes(slots), slots, max_len, self.device)
        self.cache = self.step.new_cache(slots)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            problem = graph_problem(model, self.step.dtype)
            if problem is None:
                self.graphs = DecodeGraphs(self.step, self.cache)
            else:
                log.warning("decode steps run without CUDA graphs: %s", problem)

    # ---- membership ---------------------------------------------------------------------------
    def admit(self, row: RowState) -> None:
        row.slot, row.prefilled = self.cache.acquire(), 0

    def release(self, rows: list[RowState]) -> None:
        for row in rows:
            if row.slot >= 0:
                # the columns it may have written: its prompt so far and every token it was fed
                self.cache.release(row.slot, row.prefilled + row.generated)
                row.slot = -1

    # ---- forwards -----------------------------------------------------------------------------
    def prefill(self, rows: list[RowState]) -> tuple[list[RowState], torch.Tensor]:
        """Advance the prompts of `rows` (in this order) by up to prefill_chunk tokens in all;
        (the rows whose prompt is now complete, their logits [len, V] float32)."""
        budget, chunks = self.config.prefill_chunk, []
        for row in rows:
            if budget <= 0:
                break
            take = min(len(row.job.prompt_ids) - row.prefilled, budget)
            chunks.append((row, row.prefilled, take))
            budget -= take
        n, T = len(chunks), max(take for _, _, take in chunks)
        ids = torch.zeros((n, T), dtype=torch.int64)
        pos = torch.zeros((n, T), dtype=torch.int64)
        cols = torch.full((n, T), self.cache.scratch, dtype=torch.int64)  # padding tokens write nowhere read
        for i, (row, start, take) in enumerate(chunks):
            ids[i, :take] = torch.tensor(row.job.prompt_ids[start:start + take], dtype=torch.int64)
            pos[i] = torch.arange(start, start + T)
            cols[i, :take] = pos[i, :take]
        last = torch.tensor([take - 1 for _, _, take in chunks], dtype=torch.int64)
        slots = torch.tensor([row.slot for row, _, _ in chunks], dtype=torch.int64)
        # a bucketed width, as in decode: a row's result then does not depend on its neighbours' lengths
        width = width_bucket(max(start + take for _, start, take in chunks), self.cache.max_len)
        self.cache.ready(width)
        alphas = torch.tensor([row.job.alpha for row, _, _ in chunks], dtype=torch.float32)
        with torch.inference_mode(), self._alphas(alphas):
            d = self.device
            logits = self.step.forward(self.cache, ids.to(d), pos.to(d), cols.to(d), last.to(d), width, slots.to(d))
        done = []
        for i, (row, start, take) in enumerate(chunks):
            row.prefilled = start + take
            if row.prefilled == len(row.job.prompt_ids):
                done.append(i)
        return [chunks[i][0] for i in done], logits[torch.tensor(done, dtype=torch.int64, device=logits.device)]

    def decode(self, rows: list[RowState]) -> tuple[list[RowState], torch.Tensor]:
        """Feed each row its `next_token`; (rows, logits [len(rows), V] float32 of their next position)."""
        high = self.cache.high
        n = bucket(high, self.graphs.buckets) if self.graphs is not None else high
        inputs = torch.zeros((3, n), dtype=torch.int64)  # ids, positions, columns; padding rows: token 0 at 0
        inputs[2] = self.cache.scratch
        alphas = torch.zeros(n, dtype=torch.float32)
        slots = torch.tensor([row.slot for row in rows], dtype=torch.int64)
        positions = torch.tensor([len(row.job.prompt_ids) + row.generated - 1 for row in rows], dtype=torch.int64)
        inputs[0, slots] = torch.tensor([row.next_token for row in rows], dtype=torch.int64)
        inputs[1, slots] = positions
        inputs[2, slots] = positions
        alphas[slots] = torch.tensor([row.job.alpha for row in rows], dtype=torch.float32)
        alpha_state(self.model).check(alphas)  # on the host: free; the graph path has no other check
        width = width_bucket(int(positions.max()) + 1, self.cache.max_len)
        self.cache.ready(width)
        logits = None
        if self.graphs is not None:
            try:
                logits = self.graphs.run(inputs, alphas, width)
            except Exception as err:  # a capture that fails (an op that syncs): eager from now on
                log.warning("decode steps run without CUDA graphs from now on: capture failed: %s",
                            " ".join(f"{type(err).__name__}: {err}".split()))
                self.graphs = None
                n = high
                inputs, alphas = inputs[:, :n], alphas[:n]
        if logits is None:
            with torch.inference_mode(), self._alphas(alphas):
                ids, pos, cols = (inputs[i].unsqueeze(1).to(self.device) for i in range(3))
                last = torch.zeros(n, dtype=torch.int64, device=self.device)
                logits = self.step.forward(self.cache, ids, pos, cols, last, width)
        return rows, logits.index_select(0, slots.to(logits.device))

    @contextlib.contextmanager
    def _alphas(self, alphas: torch.Tensor) -> Iterator[None]:
        """Scope the model's alpha to `alphas` [rows] (a CPU tensor: checked on the host), moved to
        the device once for the whole forward."""
        state = alpha_state(self.model)
        with state.scoped(alphas):
            state.pin(self.device)
            try:
                yield
            finally:
                state.unpin()


def _check_fits(nbytes: int, slots: int, max_len: int, device: torch.device) -> None:
    """ServeConfigError (when the engine is built) if the KV cache would not fit on the GPU."""
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > CUDA_MEMORY_SHARE * free:
        raise ServeConfigError(f"the KV cache for {slots} requests of {max_len} tokens needs {nbytes / 2**30:.1f} GiB, "
                               f"more than {CUDA_MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}; "
                               "lower --max-batch or --max-context")
