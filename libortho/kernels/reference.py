"""Pure-PyTorch reference of the dual-stream linear, straight from the storage contract.

Used by the tests (in float64) and as the fallback path for layouts the Triton kernels do not
cover (e.g. group sizes that are not a power of two). It reads only the attributes/buffers that
docs/DESIGN.md defines: ``qweight, scales, zeros, ortho_crow, ortho_col, ortho_val, bias`` and
``bits, group_size, in_features, out_features``.
"""
from __future__ import annotations

from typing import Any, Union

import torch

Alpha = Union[float, torch.Tensor]


def container_bits(bits: int) -> int:
    """Bits of storage per code: 3-bit codes live in 4-bit nibbles (docs/DESIGN.md)."""
    if bits in (3, 4):
        return 4
    if bits in (2, 8):
        return bits
    raise ValueError(f"unsupported bits={bits}")


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight uint8 [out, ceil(in_pad*cb/8)] -> integer codes int32 [out, in_features]."""
    cb = container_bits(bits)
    per_byte = 8 // cb
    q = qweight.to(torch.int32)
    shifts = torch.arange(per_byte, device=q.device, dtype=torch.int32) * cb
    codes = (q.unsqueeze(-1) >> shifts) & ((1 << cb) - 1)  # [out, bytes, per_byte]
    return codes.reshape(q.shape[0], -1)[:, :in_features]


def dequantize(layer: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_base [out, in] in ``dtype``: (c - zeros[g]) * scales[g], g = j // group_size."""
    k = int(layer.in_features)
    g = int(layer.group_size)
    codes = unpack_codes(layer.qweight, int(layer.bits), k).to(dtype)
    gidx = torch.arange(k, device=codes.device) // g
    s = layer.scales.to(dtype)[:, gidx]
    z = layer.zeros.to(dtype)[:, gidx]
    return (codes - z) * s


def ortho_dense(layer: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_ortho [out, in] as a dense matrix in ``dtype`` (CSR scattered into zeros)."""
    n, k = int(layer.out_features), int(layer.in_features)
    crow = layer.ortho_crow.to(torch.int64)
    w = torch.zeros(n, k, dtype=dtype, device=layer.ortho_val.device)
    nnz = int(layer.ortho_col.numel())
    if nnz:
        rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:] - crow[:-1])
        w[rows, layer.ortho_col.to(torch.int64)] = layer.ortho_val.to(dtype)
    return w


def reference_dual_stream(x: torch.Tensor, layer: Any, alpha: Alpha = 0.0,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Y = X W_base^T + alpha * X W_ortho^T + bias, computed in ``dtype``.

    x: [..., in]; alpha: float or tensor with one value per flattened row; returns [..., out]
    in ``dtype`` (cast the result yourself).
    """
    k, n = int(layer.in_features), int(layer.out_features)
    x2 = x.reshape(-1, k).to(dtype)
    y = x2 @ dequantize(layer, dtype).t()
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(dtype).reshape(-1, 1) if alpha.dim() > 0 else alpha.to(dtype)
        y = y + a * (x2 @ ortho_dense(layer, dtype).t())
    elif float(alpha) != 0.0:
        y = y + float(alpha) * (x2 @ ortho_dense(layer, dtype).t())
    bias = getattr(layer, "bias", None)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.reshape(*x.shape[:-1], n)
