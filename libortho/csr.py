"""The sparse ortho stream of one layer in CSR form (rows sorted, then columns), and its builders.

Storage follows docs/DESIGN.md: ``crow`` int32 [out + 1], ``col`` int32 [nnz], ``val`` float16 /
bfloat16 [nnz]; entry e of row i sits at positions crow[i] <= e < crow[i + 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OrthoCSR", "rows_of_crow", "csr_from_flat_indices"]


@dataclass
class OrthoCSR:
    """Sparse ortho stream of one layer: CSR sorted by row then column."""

    crow: torch.Tensor  # int32 [out + 1]
    col: torch.Tensor  # int32 [nnz]
    val: torch.Tensor  # float16 / bfloat16 [nnz]
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def to_dense(self) -> torch.Tensor:
        out_features, in_features = self.shape
        rows = rows_of_crow(self.crow)
        dense = torch.zeros(out_features, in_features, dtype=torch.float32, device=self.val.device)
        dense[rows.long(), self.col.long()] = self.val.float()
        return dense

    @staticmethod
    def empty(shape: tuple[int, int], dtype: torch.dtype = torch.float16) -> "OrthoCSR":
        return OrthoCSR(
            torch.zeros(shape[0] + 1, dtype=torch.int32),
            torch.zeros(0, dtype=torch.int32),
            torch.zeros(0, dtype=dtype),
            shape,
        )


def rows_of_crow(crow: torch.Tensor) -> torch.Tensor:
    """Row index of every CSR entry, from the row pointer [out + 1]."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def csr_from_flat_indices(
    flat_idx: torch.Tensor, R: torch.Tensor, dtype: torch.dtype = torch.float16
) -> OrthoCSR:
    """Ortho CSR holding R at the given flat (row * in + col) indices."""
    out_features, in_features = R.shape
    flat_idx = torch.sort(flat_idx.long()).values
    rows = torch.div(flat_idx, in_features, rounding_mode="floor")
    cols = flat_idx % in_features
    counts = torch.bincount(rows, minlength=out_features)
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=R.device)
    crow[1:] = torch.cumsum(counts, 0)
    vals = R.reshape(-1)[flat_idx].to(dtype)
    return OrthoCSR(crow.to(torch.int32), cols.to(torch.int32), vals, (out_features, in_features))
