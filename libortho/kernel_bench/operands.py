"""Benchmark operands on the GPU: random INT4 layers (enough copies to exceed the L2), ortho
streams of a given density sharing their base, torch tinygemm weights, and the bytes a call
must move."""
from __future__ import annotations

import math
import sys
from typing import Any, Optional

import torch

ROTATE_BYTES = 256 << 20  # each timed graph walks over at least this many weight bytes


def _copies(bytes_per_copy: int, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(ROTATE_BYTES / max(1, bytes_per_copy))))


def base_layers(n: int, k: int, count: int, group_size: int = 128, seed: int = 0) -> list:
    """``count`` random INT4 layers (no ortho entries yet) on the GPU."""
    from libortho.kernels.synthetic import random_layer
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [random_layer(k, n, group_size=group_size, density=0.0, device="cuda",
                         generator=gen) for _ in range(count)]


def with_ortho(base: Any, density: float, seed: int) -> Any:
    """A layer sharing ``base``'s INT4 buffers with a fresh Bernoulli(density) CSR stream."""
    from libortho.kernels.synthetic import SyntheticLayer
    n, k = base.out_features, base.in_features
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(n, k, generator=gen, device="cuda") < density
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(n + 1, dtype=torch.int32, device="cuda")
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0).to(torch.int32)
    val = (torch.randn(rows.numel(), generator=gen, device="cuda") * 0.02).half()
    return SyntheticLayer(k, n, base.bits, base.group_size, base.qweight, base.scales,
                          base.zeros, crow, cols.to(torch.int32), val, base.bias)


def with_lowrank(layer: Any, rank: int, seed: int, scale: float = 0.02) -> Any:
    """A layer sharing ``layer``'s base and CSR buffers plus a random low-rank part
    B [N, rank], A [rank, K] ~ N(0, scale) in the ortho dtype."""
    from libortho.kernels.synthetic import SyntheticLayer
    n, k = layer.out_features, layer.in_features
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = layer.ortho_val.dtype
    b = (torch.randn(n, rank, generator=gen, device="cuda") * scale).to(dt)
    a = (torch.randn(rank, k, generator=gen, device="cuda") * scale).to(dt)
    return SyntheticLayer(k, n, layer.bits, layer.group_size, layer.qweight, layer.scales,
                          layer.zeros, layer.ortho_crow, layer.ortho_col, layer.ortho_val,
                          layer.bias, (b, a))


def layer_bytes(layer: Any, m: int, with_ortho: bool, col_bytes: int = 2) -> int:
    """Bytes a fused call must move: base (+ zeros unless symmetric constant) (+ ortho)."""
    from libortho.kernels.layout import get_layout
    lay = get_layout(layer)
    n, k = layer.out_features, layer.in_features
    b = layer.qweight.numel() + layer.scales.numel() * 2 + m * k * 2 + m * n * 2
    if lay.zconst is None:
        b += layer.zeros.numel() * 2
    if with_ortho:
        b += (n + 1) * 4 + layer.ortho_col.numel() * (col_bytes + 2)
    return b


def int4pack(n: int, k: int, count: int, group_size: int = 128) -> Optional[list]:
    """``count`` weights packed for torch's tinygemm kernel, or None if unavailable."""
    try:
        out = []
        for _ in range(count):
            w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            packed = torch._convert_weight_to_int4pack(w, 8)
            sz = torch.randn(k // group_size, n, 2, device="cuda").to(torch.bfloat16) * 0.01
            out.append((packed, sz))
        return out
    except Exception as exc:  # pragma: no cover - depends on the torch build
        print(f"torch int4 packing unavailable: {exc!r}", file=sys.stderr)
        return None
