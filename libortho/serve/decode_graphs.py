"""The model steps of LlamaStep captured in CUDA graphs: decode steps and prefill chunks, one
graph per (kind, rows, tokens, width) bucket, captured once and replayed from then on.

A graph replays fixed kernels on fixed memory, so each captured step owns static device buffers
that are overwritten before each replay: `ints` (int64: token ids, positions and cache columns
[3, rows, tokens], then the index of each row's last token [rows] and the rows' slots [rows]) and
`alpha` [rows] float32. The runner packs the same layout on the host, so a replay costs two
host-to-device copies and no sync. Rows and tokens past the real ones are padding (token 0 at
position 0, written to the scratch column, alpha 0); their logits are ignored.

Decode steps read the cache in place (row r is slot r); prefill chunks name their rows' slots.

Alpha: while a graph is captured, the model's alpha switch is scoped to the graph's alpha buffer
(checked once, at capture, outside the graph), so every OrthoLinear in the graph reads its
per-row alpha from that buffer. The runner checks each step's alphas on the host first.

Graphs are captured on first use or by `warm_up` (a warm-up run on a side stream first, as CUDA
graphs require) and share one memory pool; they are replayed one at a time, by the engine's one
worker thread. A capture that fails (an op that syncs, for instance) is logged once and that
bucket runs eagerly from then on; the other buckets keep their graphs. Every capture, replay,
failure and eager step is counted in EngineStats.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..switch import alpha_state
from .engine_stats import EngineStats
from .llama_step import LlamaStep
from .slot_cache import SlotCache

log = logging.getLogger("libortho.serve")

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_WIDTH = 128  # the narrowest attention width bucket; widths double from here up to the cache length

Key = tuple[str, int, int, int]  # (kind "decode" | "prefill", rows, tokens per row, width)


def row_buckets(slots: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: powers of two below `slots`, and `slots`."""
    return tuple(b for b in ROW_BUCKETS if b < slots) + (slots,)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (buckets ascending, the last one >= n)."""
    return next(b for b in buckets if b >= n)


def width_bucket(width: int, max_len: int) -> int:
    """The attention width a step of widest row `width` runs at: a power of two times MIN_WIDTH,
    at most the cache length (so a handful of graphs cover every length)."""
    out = MIN_WIDTH
    while out < width:
        out *= 2
    return min(out, max_len)


def graph_problem(model: torch.nn.Module, dtype: torch.dtype) -> str | None:
    """Why the steps of this model cannot be captured in a CUDA graph (None: they can).

    OrthoLinear's graph-safe path is the fused kernel (INT4 codes, half-precision activations);
    its float32 reference path checks alpha on the host, which a graph cannot do."""
    from ..layer import ortho_layers

    if dtype == torch.float32:
        return "float32 activations take OrthoLinear's reference path, which reads alpha on the host"
    layers = ortho_layers(model)
    if any(layer.bits != 4 for layer in layers):
        return "some layers are not INT4, and only the INT4 kernel path runs inside a graph"
    try:
        from .. import kernels

        if not kernels.available():
            return "libortho's fused GPU kernels are not available here"
        kernels.prepare(model)  # kernel layouts built now, not inside a capture
    except ImportError as err:
        return f"libortho's fused GPU kernels cannot be imported ({err})"
    return None


def int_layout(rows: int, tokens: int) -> int:
    """Length of the packed int64 inputs of a (rows, tokens) step: 3 * rows * tokens + 2 * rows."""
    return 3 * rows * tokens + 2 * rows


def unpack(ints: torch.Tensor, rows: int, tokens: int) -> tuple[torch.Tensor, ...]:
    """Views of packed inputs [int_layout(rows, tokens)]: ids, positions, columns [rows, tokens],
    last [rows], slots [rows]."""
    grid = 3 * rows * tokens
    ids, pos, cols = ints[:grid].view(3, rows, tokens)
    return ids, pos, cols, ints[grid:grid + rows], ints[grid + rows:]


@dataclass
class Captured:
    """One captured step: replaying `graph` runs it on `ints` and `alpha`, writing `logits`."""

    graph: torch.cuda.CUDAGraph
    ints: torch.Tensor  # [int_layout(rows, tokens)] int64 on the device
    alpha: torch.Tensor  # [rows] float32 on the device
    logits: torch.Tensor  # [rows, V] float32: what each replay writes


class StepGraphs:
    """Captured steps of one LlamaStep over one SlotCache."""

    def __init__(self, step: LlamaStep, cache: SlotCache, stats: EngineStats | None = None) -> None:
        self.step, self.cache = step, cache
        self.stats = stats if stats is not None else EngineStats()
        self.buckets = row_buckets(cache.slots)
        self._graphs: dict[Key, Captured | None] = {}  # None: the capture failed, the bucket runs eagerly
        self._pool = None

    @property
    def captured(self) -> list[Key]:
        """The buckets captured so far."""
        return sorted(k for k, v in self._graphs.items() if v is not None)

    @property
    def failed(self) -> list[Key]:
        """The buckets whose capture failed (they run eagerly)."""
        return sorted(k for k, v in self._graphs.items() if v is None)

    def run(self, key: Key, ints: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor | None:
        """Replay the step of `key` on packed inputs ints [int_layout] int64 and alphas [rows]
        float32 (CPU tensors, alphas already checked); logits [rows, V] float32, valid until the
        bucket's next replay. None if the bucket has no graph (its capture failed): run it eagerly.
        Columns [0, width) must be readable (`cache.ready`)."""
        entry = self.get(key)
        if entry is None:
            return None
        entry.ints.copy_(ints, non_blocking=True)
        entry.alpha.copy_(alphas, non_blocking=True)
        entry.graph.replay()
        self.stats.step(key[0], "replays")
        return entry.logits

    def get(self, key: Key) -> Captured | None:
        """The graph of `key`, captured now if it was not yet (None: its capture failed)."""
        if key not in self._graphs:
            self._graphs[key] = self._capture(key)
        return self._graphs[key]

    def captured_step(self, rows: int, width: int) -> Captured:
        """The decode graph of (rows, width) buckets (for benchmarks that drive it directly:
        token ids are `unpack(entry.ints, rows, 1)[0]`)."""
        entry = self.get(("decode", rows, 1, width))
        if entry is None:
            raise RuntimeError(f"the decode step of {rows} rows x {width} columns could not be captured")
        return entry

    def forward(self, kind: str, ints: torch.Tensor, alpha: torch.Tensor, rows: int, tokens: int,
                width: int) -> torch.Tensor:
        """The step on device inputs (packed as in `unpack`), eagerly; logits [rows, V] float32.
        Decode steps read slots 0..rows-1 in place; prefill chunks the slots in `ints`."""
        ids, pos, cols, last, slots = unpack(ints, rows, tokens)
        return self.step.forward(self.cache, ids, pos, cols, last, width, slots if kind == "prefill" else None)

    def _capture(self, key: Key) -> Captured | None:
        kind, rows, tokens, width = key
        started = time.perf_counter()
        device = self.step.device
        ints = torch.zeros(int_layout(rows, tokens), dtype=torch.int64, device=device)
        _, _, cols, _, _ = unpack(ints, rows, tokens)
        cols.fill_(self.cache.scratch)  # padding inputs while warming up and capturing: writes go nowhere read
        alpha = torch.zeros(rows, dtype=torch.float32, device=device)
        self.cache.ready(width)
        try:
            with torch.inference_mode(), alpha_state(self.step.model).scoped(alpha):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self.forward(kind, ints, alpha, rows, tokens, width)  # kernel selection, workspaces
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a CUDA call from another thread during the capture does not invalidate it
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    logits = self.forward(kind, ints, alpha, rows, tokens, width)
        except Exception as err:  # e.g. an op that syncs: this bucket runs eagerly, the others keep graphs
            seconds = time.perf_counter() - started
            self.stats.captured(kind, seconds, ok=False)
            log.warning("the %s step of %d rows x %d tokens x %d columns runs eagerly: capture failed: %s",
                        kind, rows, tokens, width, " ".join(f"{type(err).__name__}: {err}".split()))
            return None
        self._pool = graph.pool()
        seconds = time.perf_counter() - started
        self.stats.captured(kind, seconds, ok=True)
        log.info("captured the %s step of %d rows x %d tokens x %d columns in %.0f ms",
                 kind, rows, tokens, width, 1e3 * seconds)
        return Captured(graph, ints, alpha, logits)
