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
    return KernelLayout(key=_key(layer), qw=qw, kw=int(qw.shape[1]), cbits=cb, zconst=zconst,
                        col=col, nnz=int(col.numel()))


def get_layout(layer: Any) -> KernelLayout:
    """The cached KernelLayout of ``layer``, rebuilt when its buffers changed."""
    cache = layer.kernel_layout
    if isinstance(cache, KernelLayout) and cache.key == _key(layer):
        return cache
    cache = build_layout(layer)
    layer.kernel_layout = cache
    return cache
