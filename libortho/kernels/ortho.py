"""The CSR ortho stream inside the Triton kernels: each program's slice of its output rows'
entries, and the crow -> col/val -> x gather of one chunk of it.

Operands (see libortho/kernels/triton_kernels.py): ``crow`` int32 [N+1], ``col`` int16/int32
[nnz], ``val`` fp16/bf16 [nnz]. The entries of every output row are split evenly over the
SPLIT programs of a tile (so the work stays balanced whatever the row lengths), and each slice
is walked E entries at a time. The decode kernels issue the first chunk before their K loop
(so its dependent round trips overlap the weight stream) and the rest after it; the gemm
kernel's "tile" mode walks the whole tile's slice instead (one-hot scatter, in v1.py).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _csr_slice(crow_ptr, rn, mn, pid_k, SPLIT):
    """This split's entries [lo, hi) of each output row rn (int32 [BN] each): the pid_k-th of
    SPLIT equal slices of [crow[rn], crow[rn + 1]). Rows outside the matrix (mn false) get an
    empty slice, so every later gather of theirs is masked off."""
    rs = tl.load(crow_ptr + rn, mask=mn, other=0)
    re = tl.load(crow_ptr + rn + 1, mask=mn, other=0)
    chunk = (re - rs + SPLIT - 1) // SPLIT
    lo = rs + pid_k * chunk
    hi = tl.minimum(re, lo + chunk)
    return lo, hi


@triton.jit
def _csr_gather(x_ptrs, xm, col_ptr, val_ptr, lo, hi, j0, E: tl.constexpr, XM: tl.constexpr,
                VAL_FIRST: tl.constexpr = False):
    """Entries [lo + j0, lo + j0 + E) of each row slice (clipped at hi), gathered from x.

    x_ptrs: the start of one token row (scalar pointer: x[col] is [BN, E]) or of several,
    shaped [BM, 1, 1] (x[col] is [BM, BN, E]); with XM, ``xm`` (broadcastable like x_ptrs)
    masks the gather too, for token rows past M. Returns col int32 [BN, E], val fp32 [BN, E],
    the entry mask [BN, E] and x[col] in x's dtype (0 where masked): callers gather more token
    rows with the same col, or convert x[col] where they need it.
    VAL_FIRST: issue the val load before the col load. The decode kernels' prefetched first
    chunk does, as when they were tuned: the order changes ptxas' schedule of the K loop.
    """
    p = lo[:, None] + j0 + tl.arange(0, E)[None, :]  # [BN, E]
    pm = p < hi[:, None]
    if VAL_FIRST:
        val = tl.load(val_ptr + p, mask=pm, other=0.0).to(tl.float32)
        col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
    else:
        col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
        val = tl.load(val_ptr + p, mask=pm, other=0.0).to(tl.float32)
    if XM:
        xg = tl.load(x_ptrs + col, mask=xm & pm, other=0.0)
    else:
        xg = tl.load(x_ptrs + col, mask=pm, other=0.0)
    return col, val, pm, xg


@triton.jit
def _ortho_rows(x_rows, mm, rn, mn, crow_ptr, col_ptr, val_ptr, pid_k, SPLIT,
                BM: tl.constexpr, BN: tl.constexpr, E: tl.constexpr):
    """Ortho product [BM, BN] fp32 for few token rows: this split's slice of each output
    row's CSR entries, gathered E at a time as [BM, BN, E] (no one-hot scatter)."""
    lo, hi = _csr_slice(crow_ptr, rn, mn, pid_k, SPLIT)
    longest = tl.max(hi - lo, axis=0)
    o = tl.zeros((BM, BN), dtype=tl.float32)
    for j0 in range(0, longest, E):
        col, val, pm, xg = _csr_gather(x_rows[:, :, None], mm[:, None, None], col_ptr, val_ptr,
                                       lo, hi, j0, E, True)
        o += tl.sum(xg.to(tl.float32) * val[None, :, :], axis=2)
    return o

