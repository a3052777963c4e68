"""The program tile of the Triton kernels: which output columns a program owns, and how its
result leaves it (bias, output cast and the in-launch split-K reduction over the ``ws``
workspace and ``cnt`` counters of libortho/kernels/triton_kernels.py)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_ids(N, BN: tl.constexpr):
    """(pid_m, pid_n, pid_k, rn, mn) of a program of the grid (M tiles, N tiles, SPLIT): its
    output columns rn int32 [BN] and their mask mn (rn < N)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    return pid_m, pid_n, pid_k, rn, rn < N


@triton.jit
def _store_out(acc, y_ptr, b_ptr, rm, mm, rn, mn, stride_ym, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc (+ bias), cast to y's dtype, masked to the valid rows/columns."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _finish(acc, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, mm, rn, mn, stride_ym, tile, pid_k, SPLIT,
            USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr):
    """Write the [BM, BN] fp32 tile result; with split-K, reduce the SPLIT partials first.

    Split-K without extra launches: each program stores its partial in the fp32 workspace
    ``ws`` [tiles, SPLIT, BM, BN], then bumps the tile's counter (acq_rel, gpu scope). The
    program that sees SPLIT − 1 sums the partials (L2 loads), writes y and resets the counter
    to 0, so the counters are always zero between launches (and CUDA-graph replays).
    """
    if not USE_SPLIT:
        _store_out(acc, y_ptr, b_ptr, rm, mm, rn, mn, stride_ym, HAS_BIAS)
    else:
        loc = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        base = ws_ptr + tile * (SPLIT * BM * BN)
        tl.store(base + pid_k * (BM * BN) + loc, acc, cache_modifier=".cg")
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if old == SPLIT - 1:
            tot = tl.zeros((BM, BN), dtype=tl.float32)
            for sp in range(SPLIT):
                tot += tl.load(base + sp * (BM * BN) + loc, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
            _store_out(tot, y_ptr, b_ptr, rm, mm, rn, mn, stride_ym, HAS_BIAS)

