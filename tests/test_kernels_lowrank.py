"""The coded low-rank kernels (libortho/kernels/lowrank_codes.py) against a float64 reference built from
the layer's own dequantisation, on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before the kernels are decorated
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from libortho.kernels import lowrank_codes as LC  # noqa: E402
from libortho.layer import OrthoLinear  # noqa: E402
from libortho.lowrank import LOWRANK_GROUP  # noqa: E402
from libortho.packing import n_groups, packed_bytes  # noqa: E402

if not torch.cuda.is_available():  # re-decorate in interpreter mode if imported earlier
    LC = importlib.reload(LC)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def coded_layer(k: int, n: int, r: int, bits: int, seed: int) -> OrthoLinear:
    """An OrthoLinear whose L is random `bits`-bit codes (symmetric zero 2^(bits−1), fp16 scales)."""
    g = torch.Generator().manual_seed(seed)
    layer = OrthoLinear(k, n, ortho_rank=r, lowrank_bits=bits)
    for name, width in (("ortho_Aq", k), ("ortho_Btq", n)):
        getattr(layer, name).copy_(torch.randint(0, 256, (r, packed_bytes(width, bits)), generator=g, dtype=torch.uint8))
        getattr(layer, f"{name}_scales").copy_(0.01 + 0.05 * torch.rand(r, n_groups(width, LOWRANK_GROUP), generator=g))
        getattr(layer, f"{name}_zeros").fill_(2 ** (bits - 1))
    return layer.to(DEV)


def reference(y0: torch.Tensor, x: torch.Tensor, layer: OrthoLinear, alpha) -> torch.Tensor:
    """y0 + alpha·(x·Aᵀ)·Bᵀ in float64, A and B from the layer's codes."""
    B, A = layer.lowrank_factors(torch.float64)
    a = alpha.double().reshape(-1, 1) if isinstance(alpha, torch.Tensor) else alpha
    return y0.double() + a * ((x.double() @ A.t()) @ B.t())


CASES = [  # k, n, r, bits, m, dtype, per-row alpha
    (256, 128, 16, 4, 1, torch.float16, False),
    (200, 136, 5, 4, 3, torch.float16, True),  # partial groups, a partial rank tile, odd rows
    (520, 72, 37, 8, 17, torch.bfloat16, False),  # 8-bit codes, several K splits, BM 32
    (130, 96, 20, 4, 70, torch.float16, True),  # two M blocks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}n{c[1]}r{c[2]}b{c[3]}m{c[4]}")
def test_coded_lowrank_matches_reference(case):
    k, n, r, bits, m, dtype, per_row = case
    layer = coded_layer(k, n, r, bits, seed=k + n + r)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    y0 = torch.randn(m, n, generator=g).to(DEV, dtype)
    alpha = torch.rand(m, generator=g).to(DEV) if per_row else 0.7
    expect = reference(y0, x, layer, alpha)
    y = LC.add_lowrank_codes_(y0.clone(), x, layer, alpha)
    scale = expect.abs().max().item()
    # dtype rounding of x·Aᵀ before the second product and of the output: a few ulps of the largest value
    tol = (2e-2 if dtype == torch.bfloat16 else 3e-3) * scale
    assert (y.double() - expect).abs().max().item() < tol


def test_zero_rows_of_alpha_add_exact_zeros_and_the_split_sum_is_deterministic():
    layer = coded_layer(384, 64, 16, 4, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 384, generator=g).to(DEV, torch.float16)
    y0 = torch.randn(4, 64, generator=g).to(DEV, torch.float16)
    alpha = torch.tensor([0.0, 1.0, 0.0, 1.0], device=DEV)
    y1 = LC.add_lowrank_codes_(y0.clone(), x, layer, alpha)
    y2 = LC.add_lowrank_codes_(y0.clone(), x, layer, alpha)
    assert torch.equal(y1[0::2], y0[0::2]) and not torch.equal(y1[1::2], y0[1::2])
    assert torch.equal(y1, y2)


def test_a_row_alone_gets_the_bits_it_gets_in_a_batch():
    """Rows do not mix: a row's output does not depend on the rows beside it (per-row isolation)."""
    layer = coded_layer(256, 64, 16, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 256, generator=g).to(DEV, torch.float16)
    y0 = torch.zeros(5, 64, device=DEV, dtype=torch.float16)
    batch = LC.add_lowrank_codes_(y0.clone(), x, layer, torch.ones(5, device=DEV))
    alone = LC.add_lowrank_codes_(y0[2:3].clone(), x[2:3], layer, torch.ones(1, device=DEV))
    assert torch.equal(batch[2:3], alone)


def test_bad_output_and_alpha_are_refused_and_only_coded_layers_are_supported():
    layer = coded_layer(128, 64, 16, 4, seed=5)
    x = torch.zeros(2, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"y must be a contiguous \[2, 64\]"):
        LC.add_lowrank_codes_(torch.zeros(2, 64, device=DEV), x, layer, 1.0)  # fp32 y for fp16 x
    with pytest.raises(ValueError, match="alpha has 3 values for 2 rows"):
        LC.add_lowrank_codes_(torch.zeros(2, 64, device=DEV, dtype=torch.float16), x, layer, torch.ones(3))
    assert LC.supported(layer)
    assert not LC.supported(OrthoLinear(128, 64, ortho_rank=16))  # fp16 factors: the thin GEMMs
    assert not LC.supported(OrthoLinear(128, 64, ortho_rank=0, lowrank_bits=4))
