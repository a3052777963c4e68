"""Triton kernels for Y = X·W_baseᵀ + alpha·X·W_orthoᵀ + bias (one launch per call).

Three kernels share the same operands, the same fused ortho stream (ortho.py), the same
code helpers (codes.py) and the same split-K epilogue (tile.py; one launch, partials
reduced by the last program of each tile).
One file per kernel family; this module gathers them under the names the dispatcher and the
tools use:

* ``_gemv2_kernel`` (gemv2.py) — decode v2 (the tuned default for 1–4 token rows on
  symmetric 4-bit layers): 16-byte word loads, fp16x2 dequantisation and dot products
  through inline PTX (≈ 2.8 instructions per weight), register or cp.async pipelining.
* ``_gemv_kernel`` (v1.py, FMA=True) — decode v1, 1–2 token rows per program (other layouts:
  asymmetric zeros, 2/8-bit, K not a whole number of v2 tiles). CUDA-core FMAs on the packed
  word tile in its load layout, one FFMA per weight.
* ``_gemm_kernel`` (v1.py, FMA=False) — several rows (decode batch ≥ 3, prefill). Dequantizes
  in the inner loop to the activation dtype and feeds ``tl.dot`` (fp32 accumulation).
  The two v1 kernels are one program compiled twice (one parameter list, one launch path).
* ``_tc_kernel`` (tc.py) — kernel v3, decode batches of 2–64 token rows on nibble-coded
  layers: weights as the tensor-core M operand, dequantised in registers, the ortho stream
  walked inside the K loop from a per-K-block partition of the CSR, low-rank part fused.

Operands (all device tensors, see libortho/kernels/layout.py):

* ``qw``: int32 [N, KW] — the row-major packed codes of docs/DESIGN.md viewed as 32-bit
  words (little end first, so code j of a word sits at bits [j·CBITS, (j+1)·CBITS)).
* ``s``/``z``: [N, G] group scales / zeros (any float dtype; read as fp32). With ZCONST the
  zeros are the constant ``zconst`` (symmetric layers) and ``z`` is never read.
* ortho: CSR ``crow`` int32 [N+1], ``col`` int16/int32 [nnz], ``val`` fp16/bf16 [nnz].
  The entries are split evenly over the SPLIT programs of a tile, so the work stays
  balanced whatever the row lengths. Few token rows ("rows" mode, and the gemv kernel):
  each row's slice is gathered E entries per step. Many token rows ("tile" mode): the
  tile's slice is walked in chunks of E and scattered with a one-hot [E, BN] matrix
  through ``tl.dot``.
* alpha: scalar ``alpha`` or, with ALPHA_VEC, one fp32 value per token row at ``a_ptr``.
* split-K: ``ws`` fp32 workspace [tiles·SPLIT·BM·BN], ``cnt`` int32 counters (zero between
  launches), ``KPS`` columns per split (a multiple of BK).
"""
from __future__ import annotations

from .gemv2 import _gemv2_kernel
from .tc import _tc_kernel
from .v1 import _gemm_kernel, _gemv_kernel

__all__ = ["_gemm_kernel", "_gemv_kernel", "_gemv2_kernel", "_tc_kernel"]
