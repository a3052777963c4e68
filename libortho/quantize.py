"""Group-wise integer quantization: max-scaled scales/zeros, RTN, GPTQ and code packing.

Every weight matrix W is [out, in]; groups are contiguous runs of `group_size` input columns
(the last group may be partial). Dequantization is one formula for every mode:

    W_base[i, j] = (C[i, j] - Z[i, j // g]) * S[i, j // g]

with unsigned codes C in [0, 2^bits - 1]. Scales cover each group's full range ("standard
max scaling"): no weight is clamped and no scale is shrunk to make room for the ortho stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import BITS, GROUP_SIZES, OrthoConfig
from .packing import container_bits, dequantize, expand_groups, n_groups

@dataclass(frozen=True)
class QuantSpec:
    """How the base stream is quantized (built from OrthoConfig, which holds the defaults)."""

    bits: int
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits={self.bits} is not supported; choose one of {BITS}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; choose one of {GROUP_SIZES}")

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    @property
    def container_bits(self) -> int:
        """Bits one code occupies in packed storage (3-bit codes live in 4-bit nibbles)."""
        return container_bits(self.bits)


@dataclass
class QuantizedWeight:
    """Codes [out, in] (uint8, unpacked), scales and zeros [out, n_groups] (float16)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.spec.group_size)


def scale_and_zero(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-scaled (scale, zero) for each row of `w` [out, cols] taken as one group.

    Returned in float16 (the stored precision) so that codes are computed against exactly
    the numbers that dequantization will use.
    """
    w = w.float()
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        absmax = w.abs().amax(dim=1)
        scale = absmax / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        scale = (wmax - wmin) / spec.max_code
        zero = -wmin / torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale16 = _round_up_to_fp16(scale)
    return scale16, zero.to(torch.float16)


def _round_up_to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Cast to fp16 rounding upwards, so the stored scale still covers the group's range."""
    y = x.to(torch.float16)
    below = y.float() < x
    return torch.where(below, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def group_scales_zeros(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [out, n_groups] (float16) for every group of W [out, in]."""
    out_features, in_features = W.shape
    G = n_groups(in_features, spec.group_size)
    scales = torch.empty(out_features, G, dtype=torch.float16, device=W.device)
    zeros = torch.empty_like(scales)
    for g in range(G):
        cols = slice(g * spec.group_size, min((g + 1) * spec.group_size, in_features))
        scales[:, g], zeros[:, g] = scale_and_zero(W[:, cols], spec)
    return scales, zeros


def quantize_columns(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, max_code: int
) -> torch.Tensor:
    """Nearest codes for w [out, cols] given per-row (or [out, cols]) scale and zero."""
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    codes = torch.round(w.float() / scale.float() + zero.float())
    # Only float rounding or GPTQ's error feedback can step outside the max-scaled range.
    return codes.clamp_(0, max_code)


def rtn(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of W [out, in]."""
    scales, zeros = group_scales_zeros(W, spec)
    S = expand_groups(scales, W.shape[1], spec.group_size)
    Z = expand_groups(zeros, W.shape[1], spec.group_size)
    codes = quantize_columns(W, S, Z, spec.max_code).to(torch.uint8)
    return QuantizedWeight(codes, scales, zeros, spec)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    damp: float = OrthoConfig.damp,
    block_size: int = OrthoConfig.gptq_block_size,
    act_order: bool = False,
    Hinv_upper: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Hessian-aware rounding (GPTQ, Frantar et al. 2022) of W [out, in] under H [in, in].

    Minimises ||W X - W_base X||^2 = tr((W - W_base) H (W - W_base)^T) column by column, feeding
    each column's rounding error forward through the upper Cholesky factor of H^-1, in lazy
    blocks of `block_size` columns. Scales are computed from the original W per group (static
    groups), so act-order needs no permutation at inference. Hinv_upper: the factor from
    `hinv_upper(H, damp)`, to share it between layers that read the same input.
    """
    W = W.detach().float().clone()
    out_features, in_features = W.shape
    scales, zeros = group_scales_zeros(W, spec)

    dead = torch.diag(H.detach()).float() == 0
    W[:, dead] = 0
    perm = None  # columns in their own order: no permuted copies of W and H
    if act_order:
        H = H.detach().float().clone()
        H[dead, dead] = 1
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        Hinv = _upper_cholesky_of_inverse(H, damp)
    else:
        Hinv = Hinv_upper if Hinv_upper is not None else hinv_upper(H, damp)
    columns = perm if perm is not None else torch.arange(in_features, device=W.device)
    group_of_col = torch.div(columns, spec.group_size, rounding_mode="floor")

    codes = torch.zeros(out_features, in_features, dtype=torch.uint8, device=W.device)
    # Per column the same float32 arithmetic as quantize_columns and dequantize, with each
    # block's scales and zeros gathered once, and the block held transposed ([cols, out]) so that
    # the rank-1 update of the remaining columns runs over contiguous memory: the column loop is
    # bound by per-op overhead and memory, not arithmetic.
    S, Z = scales.float(), zeros.float()
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        W1 = W[:, b0:b1].t().contiguous()  # [cols, out]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        groups = group_of_col[b0:b1]
        S1, Z1 = S[:, groups].t().contiguous(), Z[:, groups].t().contiguous()
        for j in range(b1 - b0):
            w, s, z = W1[j], S1[j], Z1[j]
            q = torch.round(w / s + z).clamp_(0, spec.max_code)
            err = (w - (q - z) * s) / Hinv1[j, j]
            W1[j:].addr_(Hinv1[j, j:], err, alpha=-1)
            Q1[j] = q
            Err1[j] = err
        codes[:, b0:b1] = Q1.t().to(torch.uint8)
        W[:, b1:] -= Err1.t().contiguous() @ Hinv[b0:b1, b1:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)].contiguous()
    return QuantizedWeight(codes, scales, zeros, spec)


def hinv_upper(H: torch.Tensor, damp: float = OrthoConfig.damp) -> torch.Tensor:
    """The upper Cholesky factor of the dampened H^-1 that `gptq` uses (dead inputs handled)."""
    H = H.detach().float()
    dead = torch.diag(H) == 0
    if bool(dead.any()):  # only then does H need a copy of its own
        H = H.clone()
        H[dead, dead] = 1
    return _upper_cholesky_of_inverse(H, damp)


def add_identity_(M: torch.Tensor, c: torch.Tensor | float) -> torch.Tensor:
    """M += c·I in place (M [n, n]): the same floats as M + c * torch.eye(n), without its two n × n temporaries.
    Every entry gets c·0 (which turns a -0.0 into +0.0, as the sum with the identity does), the diagonal c."""
    M.add_(c * 0)
    M.diagonal().add_(c)
    return M


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with more damping.
    Besides H, at most two [n, n] matrices are held at once."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        Hinv = _dampened_inverse(H, (damp * 10**attempt) * mean_diag)
        if Hinv is not None:
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise RuntimeError("H is not positive definite even after heavy dampening; use more calibration data")


def _dampened_inverse(H: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
    """(H + c·I)^-1 [n, n] through its Cholesky factor, or None where H + c·I is not positive definite."""
    L, info = torch.linalg.cholesky_ex(add_identity_(H.clone(), c))
    return torch.cholesky_inverse(L) if info == 0 else None


def inverse_hessian_diag(H: torch.Tensor, damp: float = OrthoConfig.damp) -> torch.Tensor:
    """diag([H + damp * mean(diag H) I]^-1) [in], with the same dampening GPTQ uses."""
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hd = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(Hd)))
