"""Kernel-side layout of an OrthoLinear, converted once and cached on the layer.

Owner and lifetime: every layer the kernels take (OrthoLinear, the synthetic test layer)
declares a ``kernel_layout`` field, None until the first fused call (or ``prepare``) fills it
here, and resets it itself whenever its buffers move or are cast (``_apply``). It is also rebuilt
when a buffer is replaced or modified in place (the key holds each buffer's data pointer and
version counter), so ``load_state_dict`` cannot leave it stale.

Contents (no copy of the base weights unless a row's byte count is not a multiple of 4):

* ``qw``   int32 [N, KW]  — ``qweight`` viewed as little-endian 32-bit words.
* ``zconst`` float | None — 2^(bits-1) when every zero equals it (symmetric): the kernels then
  skip reading ``zeros`` (saves 2 B per group per row, ~3 % of the bytes at g = 128).
* ``col``  int16 [nnz] when in_features ≤ 32767 else int32 — ortho columns (the CSR order and
  ``ortho_crow`` are used as they are; ``ortho_val`` is used as stored).
  4 B per ortho entry instead of 6.

Tensor-core decode kernel (tc.py, ``kernel="tc"``, 2–64 token rows) extras, built here too:

* ``tc_reason`` str | None — why the layer cannot take the tc kernel (None: it can). Checked
  once here, so unsupported layers are refused when prepared, not per call.
* ``kb``   int — K block of the ortho partition (``ORTHO_KB`` columns).
* ``kptr`` int32 [NB + 1, N], NB = cdiv(K, kb) — kptr[b, r] is the first entry of row r whose
  column is ≥ b·kb (kptr[0] = crow[:-1], kptr[NB] = crow[1:]), so a split covering columns
  [b0·kb, b1·kb) owns entries [kptr[b0, r], kptr[b1, r]) of row r. Stored [NB + 1, N] so that
  a tile of rows reads it contiguously. 4·(NB + 1)·N bytes (8192²: 1.1 MB, 3 % of the base).
* ``ocol`` / ``oval`` — the ortho columns (``col``) and values, sorted by column within each
  row; the same tensors as ``col`` / ``ortho_val`` when the stored CSR already is (the usual
  case), else permuted copies. The on-disk format is unchanged.

Building it synchronises once (the zero check); do it before CUDA-graph capture
(``libortho.kernels.prepare(model)``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch

from ..packing import container_bits


@dataclass
class KernelLayout:
    """Device tensors and constants the Triton kernels read (see module docstring)."""
    key: Tuple
    qw: torch.Tensor
    kw: int
    cbits: int
    zconst: Optional[float]
    col: torch.Tensor
    nnz: int
    tc_reason: Optional[str] = "not built"
    kb: int = 0
    kptr: Optional[torch.Tensor] = None
    ocol: Optional[torch.Tensor] = None
    oval: Optional[torch.Tensor] = None


ORTHO_KB = 256  # K block of the ortho partition: split boundaries of the tc kernel are multiples


def tc_unsupported(layer: Any, cbits: int) -> Optional[str]:
    """Why the tensor-core decode kernel (tc.py) cannot take this layer, or None."""
    g, k = int(layer.group_size), int(layer.in_features)
    if cbits != 4:
        return f"{int(layer.bits)}-bit codes are not stored in nibbles"
    if g < 32 or g & (g - 1):
        return f"group size {g} is not a power of two >= 32"
    if k % 32:
        return f"in_features {k} is not a multiple of 32 (no K masks in the kernel)"
    if not layer.scales.is_contiguous() or layer.scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return "scales are not a contiguous float tensor"
    return None


def _ortho_partition(layer: Any, col: torch.Tensor, kb: int):
    """(kptr [NB+1, N] int32, ocol, oval): the CSR entries partitioned by K block (see the
    module docstring); sorts each row's entries by column only if the stored CSR is not."""
    n, k = int(layer.out_features), int(layer.in_features)
    crow = layer.ortho_crow.to(torch.int64)
    val = layer.ortho_val
    nb = (k + kb - 1) // kb
    dev = crow.device
    nnz = int(col.numel())
    rows = torch.repeat_interleave(torch.arange(n, device=dev), crow[1:] - crow[:-1])
    c64 = col.to(torch.int64)
    if nnz > 1:
        key = rows * k + c64
        if not bool((key[1:] >= key[:-1]).all().item()):
            perm = torch.argsort(key, stable=True)
            c64, col, val = c64[perm], col[perm].contiguous(), val[perm].contiguous()
    cnt = torch.bincount(rows * nb + c64 // kb, minlength=n * nb).view(n, nb)
    kptr = torch.zeros(n, nb + 1, dtype=torch.int64, device=dev)
    kptr[:, 1:] = cnt.cumsum(1)
    kptr += crow[:-1, None]
    return kptr.t().contiguous().to(torch.int32), col, val


def _key(layer: Any) -> Tuple:
    parts = []
    for name in ("qweight", "scales", "zeros", "ortho_crow", "ortho_col", "ortho_val"):
        t = getattr(layer, name)
        parts.append((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device))
    return tuple(parts)


def _words(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, B] -> int32 [N, ceil(B/4)] (zero-padded copy only when B % 4 != 0)."""
    q = qweight.contiguous()
    n, b = q.shape
    if b % 4 != 0:
        pad = torch.zeros(n, (b + 3) // 4 * 4, dtype=torch.uint8, device=q.device)
        pad[:, :b] = q
        q = pad
    return q.view(torch.int32)


def build_layout(layer: Any) -> KernelLayout:
    """Convert the contract buffers of ``layer`` into a KernelLayout (one sync)."""
    bits = int(layer.bits)
    cb = container_bits(bits)
    qw = _words(layer.qweight)
    z0 = float(2 ** (bits - 1))
    zeros = layer.zeros
    zconst = z0 if zeros.numel() == 0 or bool(torch.all(zeros == z0).item()) else None
    col = layer.ortho_col
    coldt = torch.int16 if int(layer.in_features) <= 32767 else torch.int32
    col = col.to(coldt).contiguous()
    lay = KernelLayout(key=_key(layer), qw=qw, kw=int(qw.shape[1]), cbits=cb, zconst=zconst,
                       col=col, nnz=int(col.numel()))
    lay.tc_reason = tc_unsupported(layer, cb)
    if lay.tc_reason is None:
        lay.kb = ORTHO_KB
        lay.kptr, lay.ocol, lay.oval = _ortho_partition(layer, col, ORTHO_KB)
    return lay


def get_layout(layer: Any) -> KernelLayout:
    """The cached KernelLayout of ``layer``, rebuilt when its buffers changed."""
    cache = layer.kernel_layout
    if isinstance(cache, KernelLayout) and cache.key == _key(layer):
        return cache
    cache = build_layout(layer)
    layer.kernel_layout = cache
    return cache
