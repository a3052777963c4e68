"""One audit condition: every attack and metric on one model state, per record and summarised."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import privacy as P
from ..records import CanaryRecord
from .config import AuditConfig
from .schema import EXTRAPOLATED_METHODS, MEASURED_METHODS, MIA_SCORES, REFERENCE_SCORE, _group

__all__ = ["mia_summary", "public_record_losses"]


def _measure_exposure(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], label: str,
    details: dict[str, dict[str, Any]], cfg: AuditConfig,
) -> None:
    for record in tqdm(records, desc=f"{label}: exposure", leave=False, disable=not cfg.progress):
        result = P.exposure(
            model, tokenizer, record,
            n_samples=cfg.exposure_candidates, frontier_cap=cfg.frontier_cap,
            batch_size=cfg.batch_size, rng=P.record_rng(cfg.seed, record.id),
        )
        details[record.id].update(
            exposure=result.exposure, rank=result.rank, exposure_method=result.method,
            secret_logprob=result.secret_logprob,
        )


def _measure_extraction(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord],
    details: dict[str, dict[str, Any]], cfg: AuditConfig,
) -> None:
    for res in P.extract_secrets(model, tokenizer, records, batch_size=cfg.text_batch_size):
        details[res.id].update(extracted=res.extracted, continuation=res.continuation)


def _measure_sampled_extraction(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord],
    details: dict[str, dict[str, Any]], cfg: AuditConfig,
) -> None:
    sampling = P.Sampling(n_samples=cfg.sample_extraction, temperature=cfg.sample_temperature,
                          top_k=cfg.sample_top_k, seed=cfg.seed)
    results = P.sample_extract_secrets(model, tokenizer, records, sampling)
    for res in results:
        details[res.id].update(sampled_extracted=res.extracted, sampled_hits=res.hits, sampled_example=res.example)


def mia_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    """ROC summary of one membership score (higher = member): AUC, its 95 % Hanley-McNeil
    interval, TPR at 1 % FPR (interpolated), TPR at the lowest FPR the non-members resolve
    (1 / n, stated as ``lowest_fpr``), and the ROC points."""
    m = P.mia_metrics(member_scores, nonmember_scores)
    tpr_low, fpr_low = P.tpr_at_lowest_fpr(member_scores, nonmember_scores)
    return {
        "auc": m.auc,
        "auc_ci": list(P.auc_confidence_interval(m.auc, len(member_scores), len(nonmember_scores))),
        "tpr_at_1pct_fpr": m.tpr_at_1pct_fpr,
        "tpr_at_lowest_fpr": tpr_low,
        "lowest_fpr": fpr_low,
        "fpr": m.fpr,
        "tpr": m.tpr,
    }


def _measure_membership(
    model: torch.nn.Module, tokenizer: Any, members: Sequence[CanaryRecord], nonmembers: Sequence[CanaryRecord],
    details: dict[str, dict[str, Any]], cfg: AuditConfig,
) -> tuple[dict[str, dict[str, Any]], np.ndarray, np.ndarray]:
    """Per-record MIA statistics into ``details``; returns (metrics per score, member losses,
    non-member losses). With the public model's losses (``cfg.public_losses``) also the calibrated score."""
    stats = {
        group: P.mia_scores(model, tokenizer, [r.text for r in records], batch_size=cfg.text_batch_size)
        for group, records in (("members", members), ("nonmembers", nonmembers))
    }
    for group, records in (("members", members), ("nonmembers", nonmembers)):
        s = stats[group]
        for i, r in enumerate(records):
            details[r.id].update(loss=float(s.loss[i]), zlib_ratio=float(s.zlib_ratio[i]), min_k=float(s.min_k[i]))
    member_scores, nonmember_scores = stats["members"].member_scores(), stats["nonmembers"].member_scores()
    names = list(MIA_SCORES)
    public = cfg.public_losses
    if public is not None:
        names.append(REFERENCE_SCORE)
        for group, records, scores in (("members", members, member_scores), ("nonmembers", nonmembers, nonmember_scores)):
            scores[REFERENCE_SCORE] = P.reference_calibrated_scores(
                stats[group].loss, P.public_losses_for(public, records))
            for i, r in enumerate(records):
                details[r.id]["ref_score"] = float(scores[REFERENCE_SCORE][i])
    metrics = {name: mia_summary(member_scores[name], nonmember_scores[name]) for name in names}
    return metrics, stats["members"].loss, stats["nonmembers"].loss


def public_record_losses(
    public_model: torch.nn.Module, tokenizer: Any, members: Sequence[CanaryRecord],
    nonmembers: Sequence[CanaryRecord], text_batch_size: int = AuditConfig.text_batch_size,
) -> dict[str, float]:
    """The public model's mean token NLL (nats/token) per record id, for the P-calibrated attack.

    Members and non-members are scored in the same batches as the audit scores them, so a
    condition identical to P gets calibrated scores of exactly 0. Compute once, pass to
    :func:`audit` as ``public_losses`` for every model audited against the same P.
    """
    public_model.eval()
    out = P.record_losses(public_model, tokenizer, members, text_batch_size)
    out.update(P.record_losses(public_model, tokenizer, nonmembers, text_batch_size))
    return out


def _group_means(details: Sequence[dict[str, Any]], key: str) -> dict[str, float]:
    """Mean of ``key`` (bool or float) per group (k, or non-members) over records that have it."""
    values: dict[str, list[float]] = defaultdict(list)
    for d in details:
        if key in d:
            values[d["group"]].append(float(d[key]))
    return {g: float(np.mean(v)) for g, v in values.items()}


def _member_mean(details: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [float(d[key]) for d in details if d["member"] and key in d]
    return float(np.mean(values)) if values else None


def _exposure_means(details: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, float]:
    """Mean exposure per group over records whose exposure method is one of ``methods``."""
    return _group_means([d for d in details if d.get("exposure_method") in methods], "exposure")


def _evaluate_condition(
    model: torch.nn.Module,
    tokenizer: Any,
    label: str,
    kind: str,
    alpha: float | None,
    public_text: str,
    members: Sequence[CanaryRecord],
    nonmembers: Sequence[CanaryRecord],
    reference_losses: np.ndarray | None,
    cfg: AuditConfig,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure one model state; returns (summary row, per-record details)."""
    start = time.perf_counter()
    ppl = float(cfg.perplexity_fn(
        model, tokenizer, public_text, window=cfg.perplexity_window, max_windows=cfg.perplexity_max_windows
    ))
    labelled = [(r, True) for r in members] + [(r, False) for r in nonmembers]
    details = {r.id: {"id": r.id, "member": m, "k": r.k, "group": _group(r, m)} for r, m in labelled}

    exposure_records = list(members) + (list(nonmembers) if cfg.exposure_nonmembers else [])
    if cfg.exposure_formats is not None:
        exposure_records = [r for r in exposure_records if P.parse_format(r.secret_format).kind in cfg.exposure_formats]
    _measure_exposure(model, tokenizer, exposure_records, label, details, cfg)
    _measure_extraction(model, tokenizer, [r for r, _ in labelled], details, cfg)
    if cfg.samples(label):
        sampled = [r for r, m in labelled if m or cfg.sample_nonmembers]
        _measure_sampled_extraction(model, tokenizer, sampled, details, cfg)
    mia, member_losses, nonmember_losses = _measure_membership(model, tokenizer, members, nonmembers, details, cfg)
    ks = None if reference_losses is None else asdict(P.forget_quality(member_losses, reference_losses))
    grad_norm = P.canary_gradient_norm(model, tokenizer, members) if cfg.white_box else None

    rows = list(details.values())
    methods: dict[str, int] = defaultdict(int)
    for d in rows:
        if "exposure_method" in d:
            methods[d["exposure_method"]] += 1
    summary = {
        "label": label,
        "kind": kind,
        "alpha": alpha,
        "perplexity": ppl,
        "exposure_by_k": _group_means(rows, "exposure"),
        "extraction_by_k": _group_means(rows, "extracted"),
        "measured_exposure_by_k": _exposure_means(rows, MEASURED_METHODS),
        "extrapolated_exposure_by_k": _exposure_means(rows, EXTRAPOLATED_METHODS),
        "sampled_extraction_by_k": _group_means(rows, "sampled_extracted"),
        "exposure_mean": _member_mean(rows, "exposure"),
        "measured_exposure_mean": _member_mean(
            [d for d in rows if d.get("exposure_method") in MEASURED_METHODS], "exposure"),
        "extraction_rate": _member_mean(rows, "extracted"),
        "sampled_extraction_rate": _member_mean(rows, "sampled_extracted"),
        "member_loss_mean": float(np.mean(member_losses)),
        "nonmember_loss_mean": float(np.mean(nonmember_losses)),
        "mia": mia,
        "ks_vs_reference": ks,
        "canary_grad_norm": grad_norm,
        "exposure_methods": dict(methods),
        "seconds": time.perf_counter() - start,
    }
    return summary, rows
