"""``libortho bench``: layer-level speed of the fused dual-stream kernel on one GPU.

Rows, per layer shape (N = out, K = in) and token rows M:

* ``fp16``        torch F.linear with an fp16 weight (cuBLAS)
* ``torch_int4``  torch.ops.aten._weight_int4pack_mm (tinygemm, bf16 activations, g = 128)
* ``a0``          libortho, alpha = 0 (base stream only)
* ``a1_<d>``      libortho, alpha = 1 with d % ortho density (0.5, 1, 2)
* ``a1_1_rows``   libortho, per-row alpha tensor, 1 % ortho
* ``naive_1``     libortho alpha = 0 + a separate torch.sparse CSR product (1 %)
* ``a1_lr``       libortho alpha = 1, 1 % sparse + a rank-64 low-rank part (``lowrank=True``)
* ``*_prev``      a0 / a1_1 / a1_2 / a1_lr with kernel v3 switched off (M >= 2): the previous
                  kernels in the same run (``a1_lr_prev``: low-rank part as two thin GEMMs)

Kernel v3 (tc, 2 <= M <= 64) is off by default (libortho.kernels.dispatch); ``--v3`` switches
it on for the libortho rows, so that they and the ``*_prev`` rows compare the two paths.

Timing: every call of a row is captured in one CUDA graph that walks through enough copies of
the weights (and inputs) to exceed the L2 several times; the graph is replayed after warm-up
and each replay timed with CUDA events; the reported time is the median over replays
divided by the calls per replay (so launch overhead is excluded, as in a captured decode
step). GB/s counts every byte the row must read or write once (weights, scales, zeros if
read, ortho stream, x, y) and is shown next to the card's measured copy bandwidth
(device-to-device copy of 1 GiB, bytes read + written).

``--tune`` first sweeps tile configs per (M, N, K) and uses the fastest (``--save-configs``
writes them as the table libortho.kernels.configs loads). ``--tune-tc`` races kernel v3
configs against the previous path for 2 <= M <= 64 and fills the tc table
(``--save-tc-configs``; ``--tc-configs`` loads one).
"""
from __future__ import annotations

from .cli import add_arguments, main, run
from .layers import BATCHES, DENSITIES, SHAPES, bench_shape
from .operands import ROTATE_BYTES, base_layers, int4pack, layer_bytes, with_ortho
from .report import environment, format_tables, goals
from .timing import copy_bandwidth, time_calls
from .tuning import candidate_configs, candidate_configs_tc, candidate_configs_v2, tune, tune_tc

__all__ = ["add_arguments", "main", "run", "BATCHES", "DENSITIES", "SHAPES", "bench_shape",
           "ROTATE_BYTES", "base_layers", "int4pack", "layer_bytes", "with_ortho", "environment",
           "format_tables", "goals", "copy_bandwidth", "time_calls", "candidate_configs",
           "candidate_configs_v2", "tune", "candidate_configs_tc", "tune_tc"]
