"""The Hessian sieve: which residual entries R = W - W_base go to the sparse ortho stream.

Scores (one per weight, [out, in]):
  * ``magnitude``: |R_ij|                       (the ablation)
  * ``diag``:      R_ij^2 * H_jj                (diagonal curvature, the paper's Eq. 9)
  * ``obs``:       R_ij^2 / [H^-1]_jj           (OBS saliency, as GPTQ / SpQR use)

Selection: a global budget (fraction of all decomposed weights, compared across layers), a
per-layer budget (same fraction of each layer), or an absolute score threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .config import BUDGETS, SCORES, OrthoConfig
from .csr import OrthoCSR, rows_of_crow
from .quantize import inverse_hessian_diag


@dataclass(frozen=True)
class SieveSpec:
    """How the ortho stream is chosen (built from OrthoConfig, which holds the defaults)."""

    score: str
    ortho_ratio: float
    budget: str
    threshold: float | None
    damp: float

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not known; choose one of {SCORES}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is not known; choose one of {BUDGETS}")
        if not 0.0 <= self.ortho_ratio <= 1.0:
            raise ValueError(f"ortho_ratio={self.ortho_ratio} must lie in [0, 1] (0.01 = 1 % of weights)")
        if self.budget == "threshold" and self.threshold is None:
            raise ValueError("budget='threshold' needs a threshold value")


def impact(R: torch.Tensor, H: torch.Tensor | None, score: str, damp: float = OrthoConfig.damp) -> torch.Tensor:
    """Impact score [out, in] of each residual entry of R [out, in] under H [in, in]."""
    R = R.float()
    if score == "magnitude":
        return R.abs()
    if H is None:
        raise ValueError(f"score={score!r} needs calibration data (H); use score='magnitude' without it")
    if score == "diag":
        return R.square() * torch.diag(H).float()[None, :]
    if score == "obs":
        return R.square() / inverse_hessian_diag(H, damp)[None, :]
    raise ValueError(f"score={score!r} is not known; choose one of {SCORES}")


def top_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Flat indices of the ceil-rounded top `ratio` of `scores`."""
    k = int(round(ratio * scores.numel()))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.topk(scores.reshape(-1), k, sorted=False).indices


def global_threshold(scores: Iterable[torch.Tensor], ratio: float) -> float:
    """The score of the K-th best weight over all layers, K = round(ratio * total weights).

    Scores are compared across layers: the budget goes where the impact is largest.
    `scores` is iterated twice (a list, or a lazy collection that recomputes each layer's
    scores), never concatenated: an exact two-pass radix select on the float bits keeps the
    memory at one layer's scores. Returns +inf when K = 0 (nothing selected).
    """
    high_counts, total = torch.zeros(1 << 16, dtype=torch.long), 0
    for s in scores:
        high_counts += torch.bincount(_ordered_bits(s) >> 16, minlength=1 << 16)
        total += s.numel()
    k = int(round(ratio * total))
    if k == 0:
        return float("inf")
    high, k_left = _bin_of_kth_largest(high_counts, k)
    low_counts = sum(
        torch.bincount((keys[(keys >> 16) == high]) & 0xFFFF, minlength=1 << 16)
        for keys in (_ordered_bits(s) for s in scores)
    )
    low, _ = _bin_of_kth_largest(low_counts, k_left)
    return _float_of_ordered_bits((high << 16) | low)


def _ordered_bits(scores: torch.Tensor) -> torch.Tensor:
    """float32 scores -> int64 keys in [0, 2^32) with the same order (NaN-free input)."""
    bits = scores.reshape(-1).float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -1 - bits, bits + 2**31)  # negatives: flip so larger magnitude sorts lower


def _float_of_ordered_bits(key: int) -> float:
    bits = key - 2**31 if key >= 2**31 else -1 - key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _bin_of_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest element of a histogram, and k's rank inside that bin."""
    above = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,))  # elements in bins >= b
    b = int(torch.nonzero(above >= k).max())
    return b, k - int(above[b] - counts[b])


def select_at_or_above(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat indices whose score is >= threshold."""
    return torch.nonzero(scores.reshape(-1) >= threshold).reshape(-1)


def select_layer(scores: torch.Tensor, spec: SieveSpec) -> torch.Tensor:
    """Flat indices chosen for one layer under a per-layer budget or a threshold."""
    if spec.budget == "layer":
        return top_fraction(scores, spec.ortho_ratio)
    if spec.budget == "threshold":
        return torch.nonzero(scores.reshape(-1) > spec.threshold).reshape(-1)
    raise ValueError("a global budget is selected across layers with global_threshold, not per layer")


def refit_values(csr: OrthoCSR, R: torch.Tensor, H: torch.Tensor, damp: float = OrthoConfig.damp) -> OrthoCSR:
    """Ortho values that minimise the layer's output error on the chosen support.

    Per row i with support S: o_S = argmin (r_i - o)ᵀ H (r_i - o) = H_SS⁻¹ H_S: r_i.
    GPTQ's base has already spread each column's rounding error over later columns, so putting
    back R_ij alone would undo that compensation; the refit accounts for it (and for plain RTN
    it still helps wherever inputs are correlated). Rows with the same number of entries are
    solved together as one batched system.
    """
    if csr.nnz == 0:
        return csr
    H = H.double()
    Hd = H + damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    counts = (csr.crow[1:] - csr.crow[:-1]).long()
    starts = csr.crow[:-1].long()
    rows_of_entries = rows_of_crow(csr.crow)
    vals = R[rows_of_entries, csr.col.long()].double()  # fallback: the plain residual
    RH = R.double() @ Hd  # [out, in]; row i gathered at S gives H_S: r_i
    for k in torch.unique(counts[counts > 0]).tolist():
        if k == H.shape[0]:
            continue  # a full row: the optimum is the residual itself (already in vals)
        rows = torch.nonzero(counts == k).reshape(-1)
        for chunk in rows.split(max(1, 2**22 // (k * k))):  # bound the [rows, k, k] systems' memory
            pos = starts[chunk][:, None] + torch.arange(k, device=starts.device)[None, :]  # [rows, k] positions in the CSR arrays
            idx = csr.col.long()[pos]  # [rows, k] columns
            A = Hd[idx[:, :, None], idx[:, None, :]]  # [rows, k, k], SPD
            b = torch.gather(RH[chunk], 1, idx)  # [rows, k]
            L, info = torch.linalg.cholesky_ex(A)
            ok = info == 0
            if ok.any():
                x = torch.cholesky_solve(b[ok].unsqueeze(-1), L[ok]).squeeze(-1)
                vals[pos[ok].reshape(-1)] = x.reshape(-1)
    return OrthoCSR(csr.crow, csr.col, vals.to(csr.val.dtype), csr.shape)
