"""Pure-PyTorch reference of the dual-stream linear, straight from the storage contract
(weights from packing.py, the formula from layer.dual_stream).

Used by the tests (in float64) and as the fallback path for layouts the Triton kernels do not
cover (e.g. group sizes that are not a power of two). It reads only the attributes/buffers that
docs/DESIGN.md defines: ``qweight, scales, zeros, ortho_crow, ortho_col, ortho_val, bias`` and
``bits, group_size, in_features, out_features``.
"""
from __future__ import annotations

from typing import Any, Union

import torch

from ..layer import dual_stream
from ..packing import dequantize_packed

Alpha = Union[float, torch.Tensor]


def dequantize(layer: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_base [out, in] in ``dtype``: (c - zeros[g]) * scales[g], g = j // group_size."""
    return dequantize_packed(layer.qweight, layer.scales, layer.zeros, int(layer.bits), int(layer.group_size),
                             int(layer.in_features), dtype)


def ortho_dense(layer: Any, dtype: torch.dtype = torch.float32, lowrank: bool = False) -> torch.Tensor:
    """W_ortho [out, in] as a dense matrix in ``dtype`` (CSR scattered into zeros); lowrank:
    plus the low-rank part B·A (``ortho_B`` [out, r] · ``ortho_A`` [r, in]) when present."""
    n, k = int(layer.out_features), int(layer.in_features)
    crow = layer.ortho_crow.to(torch.int64)
    w = torch.zeros(n, k, dtype=dtype, device=layer.ortho_val.device)
    nnz = int(layer.ortho_col.numel())
    if nnz:
        rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:] - crow[:-1])
        w[rows, layer.ortho_col.to(torch.int64)] = layer.ortho_val.to(dtype)
    a = getattr(layer, "ortho_A", None)
    if lowrank and a is not None and a.shape[0] > 0:
        w += layer.ortho_B.to(dtype) @ a.to(dtype)
    return w


def reference_dual_stream(x: torch.Tensor, layer: Any, alpha: Alpha = 0.0,
                          dtype: torch.dtype = torch.float64, lowrank: bool = False) -> torch.Tensor:
    """Y = X W_base^T + alpha * X W_ortho^T + bias, computed in ``dtype``; W_ortho is the CSR
    part, plus B·A when ``lowrank`` (as ``dual_stream_linear(..., lowrank=True)``).

    x: [..., in]; alpha: float or tensor with one value per flattened row; returns [..., out]
    in ``dtype`` (cast the result yourself).
    """
    k, n = int(layer.in_features), int(layer.out_features)
    x2 = x.reshape(-1, k).to(dtype)
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else bias.to(dtype)
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(dtype).reshape(-1, 1) if alpha.dim() > 0 else alpha.to(dtype)
        y = dual_stream(x2, dequantize(layer, dtype), ortho_dense(layer, dtype, lowrank), a, bias)
    elif float(alpha) != 0.0:
        y = dual_stream(x2, dequantize(layer, dtype), ortho_dense(layer, dtype, lowrank), float(alpha),
                        bias)
    else:
        y = dual_stream(x2, dequantize(layer, dtype), bias=bias)
    return y.reshape(*x.shape[:-1], n)
