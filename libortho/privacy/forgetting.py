"""Forget quality: a two-sample KS test of per-record losses against a retrain reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["KSResult", "forget_quality"]

@dataclass
class KSResult:
    """Two-sample Kolmogorov-Smirnov test; p > 0.05 reads as "indistinguishable" (TOFU)."""

    statistic: float
    pvalue: float


def forget_quality(losses: Sequence[float], reference_losses: Sequence[float]) -> KSResult:
    """KS test between a model's and the retrain reference's per-record losses (nats/token)."""
    result = stats.ks_2samp(np.asarray(losses, dtype=np.float64), np.asarray(reference_losses, dtype=np.float64))
    return KSResult(statistic=float(result.statistic), pvalue=float(result.pvalue))
