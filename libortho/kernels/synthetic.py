"""Random layers in the OrthoLinear storage format, for tests, benchmarks and speed runs.

No decomposition involved: codes, scales, zeros and a Bernoulli(density) CSR ortho stream are
drawn at random (so the per-row entry counts are binomial, as for a real budget selection).
``SyntheticLayer`` carries exactly the buffers and attributes of docs/DESIGN.md; when
``libortho.layer.OrthoLinear`` is importable, ``as_ortholinear`` copies them into one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..packing import container_bits


class SyntheticLayer(nn.Module):
    """Stand-in with the OrthoLinear buffers; forward calls libortho.kernels on any device."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor,
                 bias: Optional[torch.Tensor] = None,
                 lowrank: Optional[tuple] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("ortho_crow", crow)
        self.register_buffer("ortho_col", col)
        self.register_buffer("ortho_val", val)
        r = 0 if lowrank is None else int(lowrank[1].shape[0])  # low-rank part B·A, as OrthoLinear
        self.register_buffer("ortho_A", lowrank[1] if r else val.new_zeros(0, in_features))
        self.register_buffer("ortho_B", lowrank[0] if r else val.new_zeros(out_features, 0))
        if bias is not None:
            self.register_buffer("bias", bias)
        else:
            self.bias = None
        self.alpha = 1.0
        self.kernel_layout = None

    def _apply(self, fn, *args, **kwargs):  # same contract as OrthoLinear
        self.kernel_layout = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import dual_stream_linear
        return dual_stream_linear(x, self, self.alpha)


def random_layer(in_features: int, out_features: int, *, bits: int = 4, group_size: int = 128,
                 symmetric: bool = True, bias: bool = False, density: float = 0.01,
                 heavy_rows: int = 0, val_dtype: torch.dtype = torch.float16,
                 scale: float = 0.02, device: str | torch.device = "cpu",
                 generator: Optional[torch.Generator] = None, rank: int = 0) -> SyntheticLayer:
    """A random layer. ``heavy_rows`` rows get every column in the ortho stream; ``rank`` > 0
    adds a low-rank part B [out, rank], A [rank, in] ~ N(0, scale) in ``val_dtype``.

    Scales ~ U(0.5, 1.5)·scale/2^(bits-1) (fp16); zeros 2^(bits-1) when symmetric, else
    U(0, 2^bits - 1) floats (fp16); ortho values ~ N(0, scale) in ``val_dtype``; bias ~ N(0, 1)
    fp16. Random bytes also fill the padding codes beyond in_features (they must be ignored).
    """
    dev = torch.device(device)
    g = generator

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=dev)

    cb = container_bits(bits)
    per_byte = 8 // cb
    in_pad = (in_features + per_byte - 1) // per_byte * per_byte
    nbytes = in_pad * cb // 8
    levels = 2 ** bits
    if bits == 3:  # 3-bit codes in nibbles: only 0..7 are valid codes
        codes = torch.randint(0, levels, (out_features, in_pad), generator=g, device=dev)
        shifts = torch.arange(per_byte, device=dev) * cb
        qweight = (codes.view(out_features, nbytes, per_byte) << shifts).sum(-1).to(torch.uint8)
    else:
        qweight = torch.randint(0, 256, (out_features, nbytes), generator=g, device=dev,
                                dtype=torch.uint8)
    ngroups = (in_features + group_size - 1) // group_size
    scales = ((0.5 + rand(out_features, ngroups)) * scale / max(1, 2 ** (bits - 1) - 1)).half()
    if symmetric:
        zeros = torch.full((out_features, ngroups), float(2 ** (bits - 1)), device=dev).half()
    else:
        zeros = (rand(out_features, ngroups) * (levels - 1)).half()
    mask = rand(out_features, in_features) < density
    if heavy_rows:
        idx = torch.randperm(out_features, generator=g, device=dev)[:heavy_rows]
        mask[idx] = True
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: sorted by row then column
    counts = torch.bincount(rows, minlength=out_features)
    crow = torch.zeros(out_features + 1, dtype=torch.int32, device=dev)
    crow[1:] = counts.cumsum(0).to(torch.int32)
    val = (torch.randn(rows.numel(), generator=g, device=dev) * scale).to(val_dtype)
    b = torch.randn(out_features, generator=g, device=dev).half() if bias else None
    low = None
    if rank:
        low = ((torch.randn(out_features, rank, generator=g, device=dev) * scale).to(val_dtype),
               (torch.randn(rank, in_features, generator=g, device=dev) * scale).to(val_dtype))
    return SyntheticLayer(in_features, out_features, bits, group_size, qweight, scales, zeros,
                          crow, cols.to(torch.int32), val, b, low)


def _ortholinear_like(src: SyntheticLayer, symmetric: bool, rank: int, lowrank_bits: int) -> nn.Module:
    """libortho.layer.OrthoLinear with ``src``'s base, sparse part and bias copied in, and room for a rank-``rank``
    low-rank part stored at ``lowrank_bits`` (left zero). ImportError if libortho is absent."""
    from libortho.layer import OrthoLinear  # type: ignore
    layer = OrthoLinear(src.in_features, src.out_features, bits=src.bits,
                        group_size=src.group_size, symmetric=symmetric,
                        bias=src.bias is not None, ortho_nnz=int(src.ortho_col.numel()),
                        ortho_dtype=src.ortho_val.dtype, ortho_rank=rank, lowrank_bits=lowrank_bits)
    layer = layer.to(src.qweight.device)
    with torch.no_grad():
        for name in ("qweight", "scales", "zeros", "ortho_crow", "ortho_col", "ortho_val"):
            getattr(layer, name).copy_(getattr(src, name))
        if src.bias is not None:
            layer.bias.copy_(src.bias.to(layer.bias.dtype))
    return layer


def as_ortholinear(src: SyntheticLayer, symmetric: bool = True,
                   lowrank: Optional[tuple] = None) -> nn.Module:
    """Copy a SyntheticLayer into libortho.layer.OrthoLinear (ImportError if it is absent).
    ``lowrank``: the low-rank part (B [out, r], A [r, in]) in the ortho dtype, or None (rank 0)."""
    layer = _ortholinear_like(src, symmetric, 0 if lowrank is None else int(lowrank[1].shape[0]), 16)
    if lowrank is not None:
        with torch.no_grad():
            layer.ortho_B.copy_(lowrank[0])
            layer.ortho_A.copy_(lowrank[1])
    return layer


def with_coded_lowrank(src: SyntheticLayer, rank: int, bits: int, seed: int = 0, symmetric: bool = True) -> nn.Module:
    """OrthoLinear copy of ``src`` with a random rank-``rank`` low-rank part held as ``bits``-bit codes (4 or 8,
    layer.OrthoLinear's ortho_Aq / ortho_Btq layout): uniform codes, zero point 2^(bits−1), fp16 scales
    chosen so that the factors' values are about 0.02 (as the fp16 factors of the benchmarks)."""
    from libortho.packing import packed_bytes
    layer = _ortholinear_like(src, symmetric, rank, bits)
    gen = torch.Generator(device=src.qweight.device).manual_seed(seed)
    with torch.no_grad():
        for name, width in (("ortho_Aq", src.in_features), ("ortho_Btq", src.out_features)):
            getattr(layer, name).copy_(torch.randint(0, 256, (rank, packed_bytes(width, bits)), generator=gen,
                                                     device=layer.qweight.device, dtype=torch.uint8))
            getattr(layer, f"{name}_scales").fill_(0.02 / 2 ** (bits - 2))
            getattr(layer, f"{name}_zeros").fill_(2 ** (bits - 1))
    return layer
