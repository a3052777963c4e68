"""The engine's model side on a slot cache: chunked prefill and decode steps for Llama-architecture
models (LlamaStep over a SlotCache), both replayed from CUDA graphs on a GPU.

  * admit: a new request takes a slot (nothing runs);
  * prefill: reads the next chunk of waiting prompts (`plan_chunk`: the first rows in admission
    order, up to a power-of-two number of tokens each, at most `config.prefill_chunk` tokens in
    all with padding, finishing as many prompts as it can), so that the engine runs a decode step between chunks and running rows keep
    streaming while a long prompt is read;
  * decode: feeds every decoding row its last sampled token, one row per slot;
  * release: a finished, failed or cancelled row gives its slot back.

On a GPU every step is padded to a bucket, (rows, tokens, width) each from a short list, so that
a handful of CUDA graphs (decode_graphs) cover every step, and the fused kernels see a handful
of shapes (each new shape costs a kernel compile: seconds, once per shape and process). On the
CPU nothing is padded: steps run eagerly at their own size.

Every forward runs with one alpha per row, checked on the host: eager forwards inside
`alpha_state(model).scoped(alphas)`, moved to the device once per forward (`pin`); graph replays
read the alphas from the graph's static buffer. The inputs of a step are packed into one int64
tensor on the host (decode_graphs.unpack gives the layout) and copied to the device at once.

Rows are the engine's: this module reads `job.prompt_ids`, `job.alpha`, `next_token` and
`generated`, and keeps `slot` and `prefilled` (prompt tokens already in the cache) up to date.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Protocol

import torch
from torch import nn

from ..hf_model import module_device
from ..switch import alpha_state
from .config import ServeConfig, ServeConfigError
from .decode_graphs import StepGraphs, bucket, graph_problem, row_buckets, unpack, width_bucket
from .engine_stats import EngineStats
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


def plan_chunk(remaining: list[int], budget: int, buckets: tuple[int, ...]) -> tuple[int, int]:
    """(k, T): the next prefill chunk reads up to T tokens (a power of two) of each of the first k
    waiting rows (`remaining`: their prompt tokens still unread, in admission order), such that
    bucket(k) * T <= budget. Of those, the chunk that completes the most prompts (their first
    token comes out of it: time to first token), then reads the most tokens, then is the smaller.
    A row never waits behind a later one: the chunk is always a prefix of the queue."""
    best, best_score, longest = (1, 1), (-1, -1), max(remaining)
    tokens_per_row = 1
    while tokens_per_row <= budget:
        fitting = [b for b in buckets if b * tokens_per_row <= budget]
        if fitting:
            k = min(len(remaining), fitting[-1])
            score = (sum(r <= tokens_per_row for r in remaining[:k]), sum(min(r, tokens_per_row) for r in remaining[:k]))
            if score > best_score:
                best, best_score = (k, tokens_per_row), score
        if tokens_per_row >= longest:
            break  # longer rows read no more tokens, and fewer rows fit
        tokens_per_row *= 2
    return best


class SlotRunner:
    """Prefill and decode of the engine's rows on one slot cache. Not thread-safe (one worker)."""

    joinable = True  # rows join and leave at any step boundary

    def __init__(self, model: nn.Module, config: ServeConfig, max_len: int, stats: EngineStats | None = None) -> None:
        self.model, self.config = model, config
        self.stats = stats if stats is not None else EngineStats()
        on_cuda = module_device(model).type == "cuda"
        self.step = LlamaStep(model, max_len, fused=config.fused_small_ops and on_cuda)
        slots = config.resolved_max_batch
        self.device = self.step.device
        if self.device.type == "cuda":
            _check_fits(self.step.cache_bytes(slots), slots, max_len, self.device)
        self.cache = self.step.new_cache(slots)
        self.buckets = row_buckets(slots)
        # padded shapes on a GPU (graphs, and few kernel shapes even eagerly); exact shapes on the CPU
        self.pad = self.device.type == "cuda"
        self.graphs: StepGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:
            problem = graph_problem(model, self.step.dtype)
            if problem is None:
                self.graphs = StepGraphs(self.step, self.cache, self.stats)
            else:
                log.warning("steps run without CUDA graphs: %s", problem)

    # ---- membership ---------------------------------------------------------------------------
    def admit(self, row: RowState) -> None:
        row.slot, row.prefilled = self.cache.acquire(), 0

    def release(self, rows: list[RowState]) -> None:
        for row in rows:
            if row.slot >= 0:
                # the columns it may have written: its prompt so far and every token it was fed
                self.cache.release(row.slot, row.prefilled + row.generated)
                row.slot = -1

    # ---- graphs -------------------------------------------------------------------------------
    def warm_up(self) -> int:
        """Capture the graphs of every decode row bucket and every prefill (rows, tokens) bucket at
        the narrowest width, so that no request waits for a capture (or a kernel compile) later;
        wider steps are captured when first needed. The number of graphs captured."""
        if self.graphs is None:
            return 0
        started, width = time.perf_counter(), width_bucket(1, self.cache.max_len)
        keys = [("decode", n, 1, width) for n in self.buckets]
        tokens = 1
        while tokens <= min(self.config.prefill_chunk, self.cache.max_len):
            keys += [("prefill", n, tokens, width) for n in self.buckets if n * tokens <= self.config.prefill_chunk]
            tokens *= 2
        captured = sum(self.graphs.get(key) is not None for key in keys)
        log.info("warm-up: %d of %d step graphs captured in %.1f s", captured, len(keys), time.perf_counter() - started)
        return captured

    # ---- forwards -----------------------------------------------------------------------------
    def prefill(self, rows: list[RowState]) -> tuple[list[RowState], torch.Tensor]:
        """Advance the prompts of `rows` (waiting rows, in admission order) by one chunk (see
        `plan_chunk`); (the rows whose prompt is now complete, their logits [len, V] float32)."""
        remaining = [len(r.job.prompt_ids) - r.prefilled for r in rows]
        k, per_row = plan_chunk(remaining, self.config.prefill_chunk, self.buckets)
        takes = [min(r, per_row) for r in remaining[:k]]
        n, T = (bucket(k, self.buckets), per_row) if self.pad else (k, max(takes))
        ids, pos, cols = [0] * (n * T), [0] * (n * T), [self.cache.scratch] * (n * T)  # padding writes nowhere read
        last, slots, alphas = [0] * n, [0] * n, [0.0] * n
        widest = 1
        for i, (row, take) in enumerate(zip(rows, takes)):
            start, at = row.prefilled, i * T
            ids[at:at + take] = row.job.prompt_ids[start:start + take]
            pos[at:at + T] = range(start, start + T)
            cols[at:at + take] = range(start, start + take)
            last[i], slots[i], alphas[i] = take - 1, row.slot, row.job.alpha
            widest = max(widest, start + take)
        self.stats.prefilled(sum(takes), n * T)
        logits = self._run("prefill", torch.tensor(ids + pos + cols + last + slots, dtype=torch.int64),
                           torch.tensor(alphas, dtype=torch.float32), n, T, width_bucket(widest, self.cache.max_len))
        done = []
        for i, (row, take) in enumerate(zip(rows, takes)):
            row.prefilled += take
            if row.prefilled == len(row.job.prompt_ids):
                done.append(i)
        if done == list(range(k)):
            return rows[:k], logits[:k]
        return [rows[i] for i in done], logits.index_select(0, torch.tensor(done, dtype=torch.int64).to(logits.device))

    def decode(self, rows: list[RowState]) -> tuple[list[RowState], torch.Tensor]:
        """Feed each row its `next_token`; (rows, logits [len(rows), V] float32 of their next position)."""
        high = self.cache.high
        n = bucket(high, self.buckets) if self.pad else high
        ids, pos, cols = [0] * n, [0] * n, [self.cache.scratch] * n  # padding rows: token 0 at 0, written nowhere read
        alphas = [0.0] * n
        for row in rows:
            s, at = row.slot, len(row.job.prompt_ids) + row.generated - 1
            ids[s], pos[s], cols[s], alphas[s] = row.next_token, at, at, row.job.alpha
        ints = torch.tensor(ids + pos + cols + [0] * (2 * n), dtype=torch.int64)  # last: token 0; slots unused
        logits = self._run("decode", ints, torch.tensor(alphas, dtype=torch.float32), n, 1,
                           width_bucket(max(pos) + 1, self.cache.max_len))
        order = [row.slot for row in rows]
        if order == list(range(n)):
            return rows, logits
        return rows, logits.index_select(0, torch.tensor(order, dtype=torch.int64).to(logits.device))

    def _run(self, kind: str, ints: torch.Tensor, alphas: torch.Tensor, rows: int, tokens: int,
             width: int) -> torch.Tensor:
        """One step on packed host inputs (decode_graphs.unpack): replayed from its graph where
        there is one, else eagerly; logits [rows, V] float32."""
        self.cache.ready(width)
        if self.graphs is not None:
            alpha_state(self.model).check(alphas)  # on the host: free; a replay has no other check
            logits = self.graphs.run((kind, rows, tokens, width), ints, alphas)
            if logits is not None:
                return logits
        self.stats.step(kind, "eager")
        with torch.inference_mode(), self._alphas(alphas):
            ids, pos, cols, last, slots = unpack(ints.to(self.device), rows, tokens)
            return self.step.forward(self.cache, ids, pos, cols, last, width, slots if kind == "prefill" else None)

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
