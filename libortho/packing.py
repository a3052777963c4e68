"""The packed storage format of the base stream, in one place: how INT codes sit in bytes, and
how they turn back into weights. Used by quantization, the CPU path of OrthoLinear, the kernels'
PyTorch reference and the tests.

Codes are unsigned, in [0, 2^bits - 1]; 3-bit codes live in 4-bit nibbles ("containers"), so a
byte holds a whole number of codes. A row of codes [in] packs into ceil(in / per_byte) bytes,
column j at bit offset (j % per_byte) * container_bits of its byte, low bits first. Groups are
contiguous runs of `group_size` input columns (the last may be partial), each with a float16
scale S and zero Z:

    W_base[i, j] = (C[i, j] - Z[i, j // g]) * S[i, j // g]
"""
from __future__ import annotations

import math

import torch

from .config import BITS


def container_bits(bits: int) -> int:
    """Bits one code occupies in packed storage: 3-bit codes live in 4-bit nibbles (docs/DESIGN.md),
    so that a byte holds a whole number of codes."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {BITS}")
    return 4 if bits == 3 else bits


def codes_per_byte(bits: int) -> int:
    """Codes of ``bits`` bits packed into one uint8."""
    return 8 // container_bits(bits)


def packed_bytes(in_features: int, bits: int) -> int:
    """Bytes one row of ``in_features`` codes packs into: ceil(in_features / codes_per_byte)."""
    return -(-in_features // codes_per_byte(bits))


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def expand_groups(per_group: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] -> [out, in] by repeating each group's value over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [out, in] into uint8 [out, in_pad * container_bits / 8].

    Column j of a byte group sits at bit offset (j % per_byte) * container_bits (low bits first).
    """
    cbits = container_bits(bits)
    per_byte = codes_per_byte(bits)
    out_features, in_features = codes.shape
    in_pad = math.ceil(in_features / per_byte) * per_byte
    c = torch.zeros(out_features, in_pad, dtype=torch.uint8, device=codes.device)
    c[:, :in_features] = codes.to(torch.uint8)
    c = c.view(out_features, in_pad // per_byte, per_byte)
    packed = torch.zeros(out_features, in_pad // per_byte, dtype=torch.uint8, device=codes.device)
    for k in range(per_byte):
        packed |= c[:, :, k] << (k * cbits)
    return packed


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 codes [out, in_features]."""
    cbits = container_bits(bits)
    per_byte = codes_per_byte(bits)
    mask = (1 << cbits) - 1
    parts = [(packed >> (k * cbits)) & mask for k in range(per_byte)]
    codes = torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)
    return codes[:, :in_features]


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W_base [out, in] in `dtype` from unpacked codes [out, in] and per-group scales/zeros [out, n_groups]:
    W_base[i, j] = (C[i, j] - Z[i, j // g]) * S[i, j // g]."""
    in_features = codes.shape[1]
    S = expand_groups(scales.to(dtype), in_features, group_size)
    Z = expand_groups(zeros.to(dtype), in_features, group_size)
    return (codes.to(dtype) - Z) * S


def dequantize_packed(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W_base [out, in_features] in `dtype` straight from storage: packed uint8 codes, fp16 scales/zeros."""
    return dequantize(unpack(packed, bits, in_features), scales, zeros, group_size, dtype)
