"""The decode step of LlamaStep captured in CUDA graphs, one per (rows, width) bucket.

A graph replays fixed kernels on fixed memory, so its inputs live in static device buffers that
are overwritten before each replay: token ids, positions and cache columns [slots] int64, and the
per-row alpha [slots] float32. A step of n occupied slots and attention width w runs the graph of
the smallest rows bucket >= n and width bucket >= w; the rows past n are padding (token 0 at
position 0, written to the scratch column, alpha 0) and their logits are ignored.

Alpha: while a graph is captured, the model's alpha switch is scoped to the static alpha buffer
(checked once, at capture, outside the graph), so every OrthoLinear in the graph reads its
per-row alpha from that buffer. The runner checks each step's alphas on the host and copies
them in before the replay; padding rows get 0.

Graphs are captured on first use (a warm-up run on a side stream first, as CUDA graphs require)
and share one memory pool; they are replayed one at a time, by the engine's one worker thread.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..switch import alpha_state
from .llama_step import LlamaStep
from .slot_cache import SlotCache

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_WIDTH = 128  # the narrowest attention width bucket; widths double from here up to the cache length


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
    """Why the decode step of this model cannot be captured in a CUDA graph (None: it can).

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


@dataclass
class Captured:
    """One captured decode step: replaying `graph` runs it on the static inputs of DecodeGraphs."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [rows, V] float32: what each replay writes


class DecodeGraphs:
    """Captured decode steps of one LlamaStep over one SlotCache."""

    def __init__(self, step: LlamaStep, cache: SlotCache) -> None:
        self.step, self.cache = step, cache
        self.buckets = row_buckets(cache.slots)
        device = step.device
        self.inputs = torch.zeros(3, cache.slots, dtype=torch.int64, device=device)  # ids, positions, columns
        self.alpha = torch.zeros(cache.slots, dtype=torch.float32, device=device)
        self.last = torch.zeros(cache.slots, dtype=torch.int64, device=device)  # one token per row: index 0
        self._graphs: dict[tuple[int, int], Captured] = {}
        self._pool = None

    @property
    def captured(self) -> list[tuple[int, int]]:
        """The (rows, width) buckets captured so far."""
        return sorted(self._graphs)

    def run(self, inputs: torch.Tensor, alphas: torch.Tensor, width: int) -> torch.Tensor:
        """Replay the step for inputs [3, rows] int64 (ids, positions, columns; rows a bucket) and
        alphas [rows] float32, both on the CPU and already checked; logits [rows, V] float32, valid
        until the next run. `width`: a width bucket, columns [0, width) made readable by the caller."""
        rows = int(inputs.shape[1])
        entry = self.captured_step(rows, width)
        self.inputs[:, :rows].copy_(inputs)
        self.alpha[:rows].copy_(alphas)
        entry.graph.replay()
        return entry.logits

    def captured_step(self, rows: int, width: int) -> Captured:
        """The graph of (rows, width) buckets, captured now if it was not yet. Its inputs are
        `inputs[:, :rows]` and `alpha[:rows]` (a benchmark may drive it directly)."""
        entry = self._graphs.get((rows, width))
        if entry is None:
            entry = self._graphs[(rows, width)] = self._capture(rows, width)
        return entry

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        ids, pos, cols = (self.inputs[i, :rows].unsqueeze(1) for i in range(3))
        return self.step.forward(self.cache, ids, pos, cols, self.last[:rows], width)

    def _capture(self, rows: int, width: int) -> Captured:
        # padding inputs while warming up and capturing: every write goes to the scratch column
        self.inputs[0, :rows] = 0
        self.inputs[1, :rows] = 0
        self.inputs[2, :rows] = self.cache.scratch
        self.alpha[:rows] = 0.0
        with torch.inference_mode(), alpha_state(self.step.model).scoped(self.alpha[:rows]):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(rows, width)  # warm-up: kernel selection and workspaces, outside the graph
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call from another thread during the capture does not invalidate it
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._forward(rows, width)
        self._pool = graph.pool()
        return Captured(graph, logits)
