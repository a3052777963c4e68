"""Membership inference: per-record scores (loss, zlib ratio, Min-K% Prob) and ROC metrics.

* Reference-calibrated membership inference (Carlini et al. 2021, "Extracting Training Data from
  Large Language Models"): a record's loss under the audited model minus its loss under the public
  checkpoint P the model was fine-tuned from. The template part of a record is as easy for P as
  for the model; only what fine-tuning added moves the difference. P's per-record losses are
  computed once (:func:`record_losses`) and passed in, so an audit of many models against one P
  never holds P next to another model.
* :func:`tpr_at_lowest_fpr`: the TPR of a membership score at the lowest false-positive rate the
  number of non-members resolves (1 / n_nonmembers), with that rate stated.

Log-probabilities and losses are in nats (per token where averaged); AUC and rates are
fractions in [0, 1].
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from ..hf_model import module_device
from ..records import CanaryRecord
from .forward import TEXT_BATCH_SIZE, encode, lm_forward

__all__ = [
    "token_logprobs",
    "min_k_prob",
    "zlib_entropy",
    "MIAScores",
    "mia_scores",
    "MIAMetrics",
    "tpr_at_fpr",
    "mia_metrics",
    "auc_confidence_interval",
    "paired_auc_difference",
    "REFERENCE_SCORE",
    "record_losses",
    "reference_calibrated_scores",
    "public_losses_for",
    "tpr_at_lowest_fpr",
]

REFERENCE_SCORE = "ref"  # name of the P-calibrated score next to loss / zlib / min_k

@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = TEXT_BATCH_SIZE
) -> list[torch.Tensor]:
    """Per text: log p(token_t | tokens_<t) for t = 1..T-1, float64 [T-1] on CPU (nats)."""
    device = module_device(model)
    encoded = [encode(tokenizer, t) for t in texts]
    out: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        # Right padding: causal attention keeps real tokens from seeing the pads.
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
        ids = ids.to(device)
        logits, _ = lm_forward(model, ids, use_cache=False)
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out.extend(lp[row, : len(seq) - 1].double().cpu() for row, seq in enumerate(chunk))
    return out


def min_k_prob(logprobs: torch.Tensor, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2024): mean of the lowest max(1, floor(k * T)) token log-probs (nats)."""
    n = max(1, int(len(logprobs) * k))
    return float(torch.sort(logprobs).values[:n].mean())


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al. 2021)."""
    return len(zlib.compress(text.encode("utf-8")))


@dataclass
class MIAScores:
    """Per-record raw statistics (arrays of shape [n]) and member scores (higher = member)."""

    loss: np.ndarray  # mean token NLL, nats/token
    nll_sum: np.ndarray  # summed token NLL, nats
    zlib_ratio: np.ndarray  # nll_sum / zlib-compressed length in bytes
    min_k: np.ndarray  # mean of the lowest k% token log-probs, nats

    def member_scores(self) -> dict[str, np.ndarray]:
        """Scores oriented so that higher means "more likely a member"."""
        return {"loss": -self.loss, "zlib": -self.zlib_ratio, "min_k": self.min_k}


def mia_scores(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], k: float = 0.2, batch_size: int = TEXT_BATCH_SIZE
) -> MIAScores:
    """Loss, zlib ratio and Min-K% Prob of each text (need >= 2 tokens per text)."""
    lps = token_logprobs(model, tokenizer, texts, batch_size)
    for text, lp in zip(texts, lps):
        if len(lp) == 0:
            raise ValueError(f"text {text!r} has fewer than 2 tokens; cannot score membership")
    nll_sum = np.array([-float(lp.sum()) for lp in lps])
    loss = np.array([-float(lp.mean()) for lp in lps])
    zlib_ratio = nll_sum / np.array([zlib_entropy(t) for t in texts], dtype=np.float64)
    mink = np.array([min_k_prob(lp, k) for lp in lps])
    return MIAScores(loss=loss, nll_sum=nll_sum, zlib_ratio=zlib_ratio, min_k=mink)


@dataclass
class MIAMetrics:
    """ROC summary of a membership score (members labelled 1)."""

    auc: float
    tpr_at_1pct_fpr: float
    fpr: list[float] = field(repr=False)
    tpr: list[float] = field(repr=False)


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float = 0.01) -> float:
    """TPR of the ROC polyline at FPR = target (linear interpolation between ROC points,
    the TPR reachable by randomising between two thresholds). Where the curve is vertical
    at ``target`` the top of the segment is taken."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    at = fpr == target
    if at.any():
        return float(tpr[at].max())
    right = int(np.searchsorted(fpr, target, side="right"))  # first point with fpr > target
    if right == 0:
        return float(tpr[0])
    if right >= len(fpr):
        return float(tpr[-1])
    left = right - 1  # last point with fpr < target: the top of its vertical run
    x0, y0, x1, y1 = fpr[left], tpr[left], fpr[right], tpr[right]
    return float(y0 + (y1 - y0) * (target - x0) / (x1 - x0))


def mia_metrics(
    member_scores: Sequence[float], nonmember_scores: Sequence[float], fpr_target: float = 0.01
) -> MIAMetrics:
    """AUC and TPR at ``fpr_target`` of a score where higher means "member".

    With fewer than 1/fpr_target non-members the 1 % point falls inside the first ROC step and
    is interpolated: read it as coarse.
    """
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)]
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ValueError("membership inference needs at least one member and one non-member")
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return MIAMetrics(
        auc=float(roc_auc_score(y, s)),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, fpr_target),
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
    )


def auc_confidence_interval(auc: float, n_members: int, n_nonmembers: int, level: float = 0.95) -> tuple[float, float]:
    """Hanley-McNeil (1982) normal-approximation interval for an ROC AUC, clipped to [0, 1].

    Needs only the AUC and the two sample sizes, so it can be put on any reported AUC; at
    AUC = 0.5 its variance is the Mann-Whitney null variance (n1 + n2 + 1) / (12 n1 n2).
    """
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError(f"an AUC interval needs at least one member and one non-member, got {n_members} and {n_nonmembers}")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_members - 1) * (q1 - auc**2) + (n_nonmembers - 1) * (q2 - auc**2)) / (n_members * n_nonmembers)
    half = float(stats.norm.ppf(0.5 + level / 2)) * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


def paired_auc_difference(
    members_a: Sequence[float], nonmembers_a: Sequence[float],
    members_b: Sequence[float], nonmembers_b: Sequence[float],
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) for two models scored on the SAME records, with a stratified paired
    bootstrap interval (members and non-members resampled separately, the same draw for both
    models): (difference, low, high). Index i of a and b must be the same record."""
    m_a, m_b = np.asarray(members_a, dtype=np.float64), np.asarray(members_b, dtype=np.float64)
    n_a, n_b = np.asarray(nonmembers_a, dtype=np.float64), np.asarray(nonmembers_b, dtype=np.float64)
    if m_a.shape != m_b.shape or n_a.shape != n_b.shape:
        raise ValueError(f"paired AUCs need the same records for both models: members {m_a.shape} vs {m_b.shape}, "
                         f"non-members {n_a.shape} vs {n_b.shape}")
    if m_a.size == 0 or n_a.size == 0:
        raise ValueError("membership inference needs at least one member and one non-member")

    def auc(members: np.ndarray, nonmembers: np.ndarray) -> np.ndarray:
        # Mann-Whitney over the last axis, ties half: [B, M] x [B, N] -> [B]
        diff = members[..., :, None] - nonmembers[..., None, :]
        return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1))

    rng = np.random.default_rng(seed)
    im = rng.integers(0, m_a.size, size=(n_boot, m_a.size))
    inn = rng.integers(0, n_a.size, size=(n_boot, n_a.size))
    boot = auc(m_a[im], n_a[inn]) - auc(m_b[im], n_b[inn])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(auc(m_a, n_a) - auc(m_b, n_b)), float(lo), float(hi)


def record_losses(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int = TEXT_BATCH_SIZE
) -> dict[str, float]:
    """Mean token NLL (nats/token) of each record's full text under ``model``, by record id.

    The statistic is the one :func:`libortho.privacy.mia_scores` calls ``loss`` (same tokenizer
    call, same tokens), so a public model's values from here can be subtracted from it. Run it
    once on P, keep the dict (it is plain data, JSON-safe), and free 
    """
    lps = token_logprobs(model, tokenizer, [r.text for r in records], batch_size)
    out: dict[str, float] = {}
    for record, lp in zip(records, lps):
        if len(lp) == 0:
            raise ValueError(f"record {record.id!r} has fewer than 2 tokens; cannot score membership")
        out[record.id] = -float(lp.mean())
    return out


def reference_calibrated_scores(
    losses: Sequence[float] | np.ndarray, public_losses: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Member score = loss under P - loss under the model (higher = more likely a member).

    ``losses`` and ``public_losses``: mean token NLL (nats/token) of the same records in the
    same order, shape [n] each. Returns float64 [n].
    """
    a = np.asarray(losses, dtype=np.float64)
    b = np.asarray(public_losses, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"losses {a.shape} and public losses {b.shape} must cover the same records")
    return b - a


def public_losses_for(public_losses: Mapping[str, float], records: Sequence[CanaryRecord]) -> np.ndarray:
    """P's losses in the order of ``records`` (float64 [n]); names the records it lacks."""
    missing = [r.id for r in records if r.id not in public_losses]
    if missing:
        raise ValueError(f"public-model losses lack {len(missing)} record(s), e.g. {missing[:3]}")
    return np.array([float(public_losses[r.id]) for r in records], dtype=np.float64)


def tpr_at_lowest_fpr(
    member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(TPR, FPR) at the lowest nonzero FPR the non-members resolve: FPR = 1 / n_nonmembers.

    The TPR is the largest one of any threshold whose FPR is at most 1 / n (the ROC points of
    :func:`sklearn.metrics.roc_curve`, no interpolation): the fraction of members scoring at least
    as high as the highest-scoring non-member, where ties at that score keep the FPR within 1 / n.
    With 24 non-members the stated FPR is 4.2 %; a "TPR at 1 % FPR" is not measurable there.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size == 0 or n.size == 0:
        raise ValueError("membership inference needs at least one member and one non-member")
    y = np.r_[np.ones(m.size), np.zeros(n.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[m, n], drop_intermediate=False)
    lowest = 1.0 / n.size
    ok = fpr <= lowest * (1 + 1e-12)
    return float(tpr[ok].max()), lowest
