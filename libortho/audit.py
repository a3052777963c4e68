"""``libortho audit``: privacy and quality of a model over an alpha sweep, plus a report.

For each condition (each alpha of a LibOrtho model, or the model as is, and the retrain
reference) it measures retain perplexity, canary exposure, greedy and sampled extraction per
insertion count k, membership inference (loss / zlib / Min-K%, and loss calibrated by the public
model P when P or its per-record losses are given; AUC with its interval and the TPR at the
lowest FPR the non-members resolve) and the KS forget-quality test against the reference, then
writes ``report.json``, ``report.md``, ``alpha_sweep.png``, ``roc.png`` and ``auc_alpha.png``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from libortho import attacks as ATK
from libortho import goals as G
from libortho import privacy as P
from libortho.privacy import CanaryRecord

__all__ = [
    "audit", "audit_from_paths", "public_record_losses", "mia_summary", "parse_alphas", "load_any_model",
    "write_report", "render_markdown",
]

AlphaSpec = float | str | None
ModelLoader = Callable[[str], tuple[torch.nn.Module, Any]]
PerplexityFn = Callable[..., float]
AlphaScope = Callable[[torch.nn.Module, float], ContextManager[Any]]

MIA_SCORES = ("loss", "zlib", "min_k")
REFERENCE_SCORE = ATK.REFERENCE_SCORE  # loss minus the public model's loss, when P is given
NONMEMBER_GROUP = "nonmember"
MEASURED_METHODS = ("exact", "trie-sampled", "enumeration", "sampled-rank")  # ranks observed
EXTRAPOLATED_METHODS = ("skewnorm",)  # ranks fitted beyond what the candidates resolve


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def parse_alphas(spec: str | Sequence[AlphaSpec] | None) -> list[float | None] | None:
    """``"0,0.25,1"`` / ``[0, 0.5, "fp"]`` -> floats, ``None`` for "model as is" ("fp", "none").

    ``None`` in, ``None`` out (evaluate the model as is).
    """
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[float | None] = []
    for item in items:
        if item is None or (isinstance(item, str) and item.lower() in ("fp", "none", "model")):
            out.append(None)
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"bad alpha {item!r}: expected a number or 'fp' (model as is)") from None
        if not math.isfinite(value):
            raise ValueError(f"bad alpha {item!r}: must be finite")
        out.append(value)
    if not out:
        raise ValueError("no alphas given")
    return out


def _conditions(alphas: Sequence[AlphaSpec] | None) -> list[tuple[str, float | None]]:
    """(label, alpha) per condition; alpha None = evaluate the model as is."""
    parsed = parse_alphas(alphas) if alphas is not None else [None]
    labels = [("model" if a is None else f"alpha={a:g}", a) for a in parsed]
    seen = set()
    for label, _ in labels:
        if label in seen:
            raise ValueError(f"alpha listed twice: {label}")
        seen.add(label)
    return labels


def _validate_records(members: Sequence[CanaryRecord], nonmembers: Sequence[CanaryRecord]) -> None:
    if not members:
        raise ValueError("no member records given")
    if not nonmembers:
        raise ValueError("no non-member records given")
    ids = [r.id for r in members] + [r.id for r in nonmembers]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"record ids must be unique across members and non-members; repeated: {dup[:5]}")


def _resolve_alpha_scope(fn: AlphaScope | None) -> AlphaScope:
    if fn is not None:
        return fn
    import libortho

    return libortho.alpha


def _check_alphas(model: torch.nn.Module, conditions: list[tuple[str, float | None]], scope: AlphaScope) -> None:
    """Fail before the long run if an alpha cannot be set (plain model, out of range, no ortho)."""
    for label, alpha in conditions:
        if alpha is None:
            continue
        try:
            with scope(model, alpha):
                pass
        except ValueError as exc:
            raise ValueError(f"cannot evaluate {label}: {exc} (for a plain model use alphas=None)") from exc


def _resolve_perplexity(fn: PerplexityFn | None) -> PerplexityFn:
    if fn is not None:
        return fn
    from libortho.evaluation import perplexity

    return perplexity


# --------------------------------------------------------------------------------------
# One condition
# --------------------------------------------------------------------------------------


def _record_rng(seed: int, record_id: str) -> np.random.Generator:
    # Same random candidates for a record under every condition (common random numbers).
    return np.random.default_rng([seed, zlib.crc32(record_id.encode("utf-8"))])


def _group(record: CanaryRecord, member: bool) -> str:
    return str(record.k) if member else NONMEMBER_GROUP


def _sorted_groups(groups: Sequence[str]) -> list[str]:
    return sorted(groups, key=lambda g: (g == NONMEMBER_GROUP, int(g) if g.isdigit() else 0))


def _group_name(group: str) -> str:
    return "non-members" if group == NONMEMBER_GROUP else f"k={group}"


def _measure_exposure(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], label: str,
    details: dict[str, dict[str, Any]], opts: dict[str, Any],
) -> None:
    for record in tqdm(records, desc=f"{label}: exposure", leave=False, disable=not opts["progress"]):
        result = P.exposure(
            model, tokenizer, record,
            n_samples=opts["exposure_candidates"], frontier_cap=opts["frontier_cap"],
            batch_size=opts["batch_size"], rng=_record_rng(opts["seed"], record.id),
        )
        details[record.id].update(
            exposure=result.exposure, rank=result.rank, exposure_method=result.method,
            secret_logprob=result.secret_logprob,
        )


def _measure_extraction(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord],
    details: dict[str, dict[str, Any]], opts: dict[str, Any],
) -> None:
    for res in P.extract_secrets(model, tokenizer, records, batch_size=opts["text_batch_size"]):
        details[res.id].update(extracted=res.extracted, continuation=res.continuation)


def _measure_sampled_extraction(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord],
    details: dict[str, dict[str, Any]], opts: dict[str, Any],
) -> None:
    results = ATK.sample_extract_secrets(
        model, tokenizer, records, n_samples=opts["sample_extraction"], temperature=opts["sample_temperature"],
        top_k=opts["sample_top_k"], seed=opts["seed"],
    )
    for res in results:
        details[res.id].update(sampled_extracted=res.extracted, sampled_hits=res.hits, sampled_example=res.example)


def mia_summary(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    """ROC summary of one membership score (higher = member): AUC, its 95 % Hanley-McNeil
    interval, TPR at 1 % FPR (interpolated), TPR at the lowest FPR the non-members resolve
    (1 / n, stated as ``lowest_fpr``), and the ROC points."""
    m = P.mia_metrics(member_scores, nonmember_scores)
    tpr_low, fpr_low = ATK.tpr_at_lowest_fpr(member_scores, nonmember_scores)
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
    details: dict[str, dict[str, Any]], opts: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], np.ndarray, np.ndarray]:
    """Per-record MIA statistics into ``details``; returns (metrics per score, member losses,
    non-member losses). With the public model's losses in ``opts`` also the calibrated score."""
    stats = {
        group: P.mia_scores(model, tokenizer, [r.text for r in records], batch_size=opts["text_batch_size"])
        for group, records in (("members", members), ("nonmembers", nonmembers))
    }
    for group, records in (("members", members), ("nonmembers", nonmembers)):
        s = stats[group]
        for i, r in enumerate(records):
            details[r.id].update(loss=float(s.loss[i]), zlib_ratio=float(s.zlib_ratio[i]), min_k=float(s.min_k[i]))
    member_scores, nonmember_scores = stats["members"].member_scores(), stats["nonmembers"].member_scores()
    names = list(MIA_SCORES)
    public = opts.get("public_losses")
    if public is not None:
        names.append(REFERENCE_SCORE)
        for group, records, scores in (("members", members, member_scores), ("nonmembers", nonmembers, nonmember_scores)):
            scores[REFERENCE_SCORE] = ATK.reference_calibrated_scores(
                stats[group].loss, ATK.public_losses_for(public, records))
            for i, r in enumerate(records):
                details[r.id]["ref_score"] = float(scores[REFERENCE_SCORE][i])
    metrics = {name: mia_summary(member_scores[name], nonmember_scores[name]) for name in names}
    return metrics, stats["members"].loss, stats["nonmembers"].loss


def public_record_losses(
    public_model: torch.nn.Module, tokenizer: Any, members: Sequence[CanaryRecord],
    nonmembers: Sequence[CanaryRecord], text_batch_size: int = 16,
) -> dict[str, float]:
    """The public model's mean token NLL (nats/token) per record id, for the P-calibrated attack.

    Members and non-members are scored in the same batches as the audit scores them, so a
    condition identical to P gets calibrated scores of exactly 0. Compute once, pass to
    :func:`audit` as ``public_losses`` for every model audited against the same P.
    """
    public_model.eval()
    out = ATK.record_losses(public_model, tokenizer, members, text_batch_size)
    out.update(ATK.record_losses(public_model, tokenizer, nonmembers, text_batch_size))
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
    opts: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure one model state; returns (summary row, per-record details)."""
    start = time.perf_counter()
    ppl = float(opts["perplexity_fn"](
        model, tokenizer, public_text, window=opts["perplexity_window"], max_windows=opts["perplexity_max_windows"]
    ))
    labelled = [(r, True) for r in members] + [(r, False) for r in nonmembers]
    details = {r.id: {"id": r.id, "member": m, "k": r.k, "group": _group(r, m)} for r, m in labelled}

    exposure_records = list(members) + (list(nonmembers) if opts["exposure_nonmembers"] else [])
    if opts["exposure_formats"] is not None:
        exposure_records = [r for r in exposure_records if P.parse_format(r.secret_format).kind in opts["exposure_formats"]]
    _measure_exposure(model, tokenizer, exposure_records, label, details, opts)
    _measure_extraction(model, tokenizer, [r for r, _ in labelled], details, opts)
    if opts["sample_extraction"]:
        sampled = [r for r, m in labelled if m or opts["sample_nonmembers"]]
        _measure_sampled_extraction(model, tokenizer, sampled, details, opts)
    mia, member_losses, nonmember_losses = _measure_membership(model, tokenizer, members, nonmembers, details, opts)
    ks = None if reference_losses is None else asdict(P.forget_quality(member_losses, reference_losses))
    grad_norm = P.canary_gradient_norm(model, tokenizer, members) if opts["white_box"] else None

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


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def audit(
    model: torch.nn.Module,
    tokenizer: Any,
    public_text: str,
    members: Sequence[CanaryRecord],
    nonmembers: Sequence[CanaryRecord],
    alphas: Sequence[AlphaSpec] | None = None,
    reference: torch.nn.Module | None = None,
    out_dir: str | os.PathLike | None = None,
    exposure_candidates: int = 1000,
    progress: bool = True,
    *,
    reference_tokenizer: Any = None,
    frontier_cap: int = 256,
    exposure_nonmembers: bool = False,
    perplexity_window: int = 256,
    perplexity_max_windows: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    text_batch_size: int = 16,
    alpha_scope: AlphaScope | None = None,
    perplexity_fn: PerplexityFn | None = None,
    extra_settings: dict[str, Any] | None = None,
    baselines: dict[str, tuple[torch.nn.Module, Any]] | None = None,
    white_box: bool = True,
    exposure_formats: Sequence[str] | None = None,
    public_model: torch.nn.Module | None = None,
    public_tokenizer: Any = None,
    public_losses: dict[str, float] | None = None,
    sample_extraction: int = 0,
    sample_top_k: int = 40,
    sample_temperature: float = 1.0,
    sample_nonmembers: bool = True,
    goals: bool = True,
) -> dict[str, Any]:
    """Audit ``model`` at each alpha (``None``/"fp" = as is) and the ``reference`` model.

    ``baselines``: further models evaluated as they are, one row each, by label -> (model,
    tokenizer), e.g. ``{"fp": (finetuned_fp_model, tok)}``; they are listed first.

    Puts the models in eval mode. Each numeric alpha is applied with the scoped
    ``libortho.alpha(model, a)`` (or ``alpha_scope``), so the model's own alpha is untouched
    afterwards; it raises ``ValueError`` for a plain model: use ``alphas=None`` there (all
    alphas are checked before anything runs). ``exposure_candidates`` is the random
    sample size for the sampled / skew-normal exposure estimates; ``frontier_cap`` bounds
    the digit-trie search (see :func:`libortho.privacy.exposure`). ``extra_settings`` (e.g.
    ortho density, bits per parameter) is copied into the report's settings. ``batch_size``:
    candidates / trie nodes per forward; ``text_batch_size``: records per forward for
    extraction and membership scores. ``white_box``: also measure the norm of the members'
    secret-loss gradient w.r.t. the decoder's linear weights
    (:func:`libortho.privacy.canary_gradient_norm`). ``exposure_formats``: measure exposure only for
    records whose secret format is of these kinds (e.g. ``("digits",)``); None = every record.

    Public-model calibration (score ``"ref"``): the record's loss under each condition minus its
    loss under the public model P. Pass ``public_losses`` (record id -> mean token NLL under P,
    from :func:`libortho.attacks.record_losses`, e.g. cached from an earlier audit's
    ``report["public_losses"]``), or ``public_model`` (and ``public_tokenizer`` when P's
    tokenizer differs): its losses are computed once, before any condition, so the caller may
    free P afterwards. ``sample_extraction``: samples per record prefix for extraction by
    sampling (temperature ``sample_temperature``, top-k ``sample_top_k``; 0 = greedy only), of the
    members and, with ``sample_nonmembers``, the non-members too (a false-positive control).
    Sampling costs about ``sample_extraction`` / 5 times greedy extraction (SmolLM2-135M on a
    loaded 2-core CPU: ~40 s per record at 64 samples; on CPU consider fewer samples or members
    only). Off (0) by default here for that cost; ``libortho audit`` samples 64 by default.
    ``goals``: add the pass/fail goal lines of :func:`libortho.goals.evaluate_goals`.

    Returns the report (plain data, as written to ``report.json``): ``settings``, ``rows``
    (one summary per condition, reference last), ``records`` (per-record details by label),
    ``public_losses`` (or None) and ``goals`` (when asked for).
    """
    if not public_text or not public_text.strip():
        raise ValueError("public_text is empty")
    _validate_records(members, nonmembers)
    conditions = _conditions(alphas)
    if sample_extraction < 0:
        raise ValueError(f"sample_extraction must be >= 0, got {sample_extraction}")
    if public_losses is None and public_model is not None:
        public_losses = public_record_losses(public_model, public_tokenizer or tokenizer, members, nonmembers,
                                             text_batch_size)
    opts = {
        "perplexity_fn": _resolve_perplexity(perplexity_fn),
        "perplexity_window": perplexity_window,
        "perplexity_max_windows": perplexity_max_windows,
        "exposure_candidates": exposure_candidates,
        "frontier_cap": frontier_cap,
        "exposure_nonmembers": exposure_nonmembers,
        "batch_size": batch_size,
        "text_batch_size": text_batch_size,
        "seed": seed,
        "progress": progress,
        "white_box": white_box,
        "exposure_formats": None if exposure_formats is None else tuple(exposure_formats),
        "public_losses": None if public_losses is None else dict(public_losses),
        "sample_extraction": int(sample_extraction),
        "sample_top_k": int(sample_top_k),
        "sample_temperature": float(sample_temperature),
        "sample_nonmembers": bool(sample_nonmembers),
    }
    if public_losses is not None:  # fail before the long run, naming the records P's losses lack
        ATK.public_losses_for(public_losses, list(members) + list(nonmembers))
    scope = _resolve_alpha_scope(alpha_scope) if any(a is not None for _, a in conditions) else None
    if scope is not None:
        _check_alphas(model, conditions, scope)

    rows: list[dict[str, Any]] = []
    records: dict[str, list[dict[str, Any]]] = {}
    reference_row = None
    reference_losses = None
    baselines = baselines or {}
    steps = tqdm(total=len(conditions) + (reference is not None) + len(baselines), desc="audit", disable=not progress)
    if reference is not None:
        # The reference goes first: every other row's KS test compares against its losses.
        reference.eval()
        steps.set_postfix_str("reference")
        reference_row, records["reference"] = _evaluate_condition(
            reference, reference_tokenizer or tokenizer, "reference", "reference", None,
            public_text, members, nonmembers, None, opts,
        )
        reference_losses = np.array([d["loss"] for d in records["reference"] if d["member"]])
        reference_row["ks_vs_reference"] = asdict(P.forget_quality(reference_losses, reference_losses))
        steps.update()

    for label, (base_model, base_tok) in baselines.items():
        steps.set_postfix_str(label)
        base_model.eval()
        row, records[label] = _evaluate_condition(
            base_model, base_tok or tokenizer, label, "model", None,
            public_text, members, nonmembers, reference_losses, opts,
        )
        rows.append(row)
        steps.update()

    model.eval()
    for label, alpha in conditions:
        steps.set_postfix_str(label)
        with nullcontext() if alpha is None else scope(model, alpha):
            row, records[label] = _evaluate_condition(
                model, tokenizer, label, "model" if alpha is None else "alpha", alpha,
                public_text, members, nonmembers, reference_losses, opts,
            )
        rows.append(row)
        steps.update()
    steps.close()
    if reference_row is not None:
        rows.append(reference_row)

    report = {
        "settings": _settings(
            list(baselines), members, nonmembers, conditions, reference is not None, public_text, opts, extra_settings
        ),
        "rows": rows,
        "records": records,
        "public_losses": opts["public_losses"],
    }
    report = _plain(report)
    if goals:
        report["goals"] = G.evaluate_goals(report)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _settings(
    baseline_labels: Sequence[str],
    members: Sequence[CanaryRecord],
    nonmembers: Sequence[CanaryRecord],
    conditions: list[tuple[str, float | None]],
    has_reference: bool,
    public_text: str,
    opts: dict[str, Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    import transformers

    counts: dict[str, int] = defaultdict(int)
    for r in members:
        counts[str(r.k)] += 1
    settings = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "conditions": list(baseline_labels) + [label for label, _ in conditions] + (["reference"] if has_reference else []),
        "n_members": len(members),
        "n_nonmembers": len(nonmembers),
        "members_per_k": dict(counts),
        "secret_formats": sorted({r.secret_format for r in list(members) + list(nonmembers)}),
        "public_text_chars": len(public_text),
        "perplexity_window": opts["perplexity_window"],
        "perplexity_max_windows": opts["perplexity_max_windows"],
        "exposure_candidates": opts["exposure_candidates"],
        "frontier_cap": opts["frontier_cap"],
        "exposure_nonmembers": opts["exposure_nonmembers"],
        "seed": opts["seed"],
        "min_k_fraction": 0.2,
        "public_model_calibration": opts["public_losses"] is not None,
        "sample_extraction": (
            {"samples": opts["sample_extraction"], "temperature": opts["sample_temperature"],
             "top_k": opts["sample_top_k"], "tokens": "secret tokens + 4", "rule": "any sample contains the secret",
             "nonmembers": opts["sample_nonmembers"]}
            if opts["sample_extraction"] else None),
        "tie_rule": "candidates within the tie tolerance of the secret count half a rank",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    settings.update(extra or {})
    return settings


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------
# Report files
# --------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Write report.json, report.md, alpha_sweep.png, roc.png and auc_alpha.png (each atomically)."""
    import json

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    _plot_alpha_sweep(report["rows"], out / "alpha_sweep.png")
    _plot_roc(report["rows"], out / "roc.png")
    _plot_auc_alpha(report["rows"], out / "auc_alpha.png")
    P.atomic_write_text(out / "report.md", render_markdown(report))
    P.atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _score_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """MIA scores present in every row, in report order (loss, zlib, min_k[, ref])."""
    names = [n for n in (*MIA_SCORES, REFERENCE_SCORE) if all(n in r["mia"] for r in rows)]
    return names


SCORE_LABELS = {"loss": "loss", "zlib": "zlib", "min_k": "Min-K%", REFERENCE_SCORE: "P-calibrated loss"}


def _exposure_groups(rows: Sequence[dict[str, Any]], key: str) -> list[str]:
    return _sorted_groups({g for r in rows for g in r.get(key, {})})


def render_markdown(report: dict[str, Any]) -> str:
    """Readable report: headline (measured exposure only), membership inference, extrapolated
    exposure in its own section, goals, per-record exposure."""
    rows, s = report["rows"], report["settings"]
    groups = _sorted_groups({g for r in rows for g in list(r["exposure_by_k"]) + list(r["extraction_by_k"])})
    measured_groups = _exposure_groups(rows, "measured_exposure_by_k")
    sampled = bool(s.get("sample_extraction"))
    parts = ["# libortho privacy audit", ""]
    parts += [f"- {key}: {value}" for key, value in s.items() if key != "versions"]
    parts += [f"- versions: {s.get('versions')}", ""]

    parts += ["## Leakage and quality", "",
              "Exposure in bits (max log2|R|) from measured ranks only (exact or sampled digit trie, enumeration, "
              "sampled rank); skew-normal extrapolations are in their own section below. Greedy extraction = "
              "fraction of records whose greedy continuation starts with the secret"
              + ("; sampled extraction = fraction with the secret in any of "
                 f"{s['sample_extraction']['samples']} samples (temperature {s['sample_extraction']['temperature']:g}, "
                 f"top-k {s['sample_extraction']['top_k']}) of secret tokens + 4" if sampled else "")
              + ". KS p vs the retrain reference on member losses (p > 0.05: indistinguishable); last column: "
              "white-box check, norm of the gradient of the members' secret-token loss w.r.t. the decoder's linear "
              "weights at that alpha (small = at a memorised minimum).", ""]
    header = ["condition", "PPL"] + [f"exposure {_group_name(g)}" for g in measured_groups]
    header += [f"greedy extraction {_group_name(g)}" for g in groups]
    if sampled:
        header += [f"sampled extraction {_group_name(g)}" for g in groups]
    header += ["member loss", "non-member loss", "KS p", "‖∇W secret loss‖"]
    body = []
    for r in rows:
        ks = r["ks_vs_reference"]
        cells = [r["label"], _fmt(r["perplexity"])]
        cells += [_fmt(r.get("measured_exposure_by_k", {}).get(g)) for g in measured_groups]
        cells += [_fmt(r["extraction_by_k"].get(g)) for g in groups]
        if sampled:
            cells += [_fmt(r.get("sampled_extraction_by_k", {}).get(g)) for g in groups]
        cells += [_fmt(r["member_loss_mean"], 3), _fmt(r["nonmember_loss_mean"], 3), _fmt(ks and ks["pvalue"], 3),
                  _fmt(r.get("canary_grad_norm"), 3)]
        body.append(cells)
    parts += [_table(header, body), ""]

    names = _score_names(rows)
    n_non = s.get("n_nonmembers")
    lowest = f"1/{n_non} = {100 / n_non:.2g} %" if n_non else "1/n"
    parts += ["## Membership inference", "",
              f"Members = trained private records, non-members = records of the same templates never trained. "
              f"AUC with its 95 % interval (Hanley-McNeil); TPR at FPR {lowest}, the lowest FPR the "
              f"{n_non} non-members resolve (ROC points, no interpolation). Scores: loss (mean token NLL), zlib "
              "(NLL / zlib length), Min-K% (mean of the lowest 20 % token log-probs)"
              + (", P-calibrated loss (the record's loss minus its loss under the public model P, "
                 "Carlini et al. 2021)" if REFERENCE_SCORE in names else "") + ".", ""]
    header = ["condition"] + [f"AUC {SCORE_LABELS[n]}" for n in names] + [f"TPR {SCORE_LABELS[n]}" for n in names]
    body = []
    for r in rows:
        cells = [r["label"]]
        for n in names:
            m = r["mia"][n]
            ci = m.get("auc_ci")
            cells.append(_fmt(m["auc"], 3) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        cells += [_fmt(r["mia"][n].get("tpr_at_lowest_fpr"), 3) for n in names]
        body.append(cells)
    parts += [_table(header, body), ""]

    extra_groups = _exposure_groups(rows, "extrapolated_exposure_by_k")
    if extra_groups:
        parts += ["## Extrapolated exposure (skew-normal fit, not a measured rank)", "",
                  "For records whose candidate space is too large to rank the secret among measured candidates "
                  "(e.g. hex keys), exposure is extrapolated from a skew-normal fit to the sampled candidates' "
                  "scores. It can exceed the largest measurable value and is not comparable with the measured "
                  "exposure above.", ""]
        header = ["condition"] + [f"extrapolated exposure {_group_name(g)}" for g in extra_groups]
        body = [[r["label"]] + [_fmt(r.get("extrapolated_exposure_by_k", {}).get(g)) for g in extra_groups]
                for r in rows]
        parts += [_table(header, body), ""]

    if report.get("goals"):
        parts += ["## Goals", "", "Each line: attack; comparator; pass rule; measured value.", ""]
        for g in report["goals"]:
            parts.append(f"- [{'PASS' if g['passed'] else 'FAIL'}] **{g['goal']}** — attack: {g['attack']}; "
                         f"comparator: {g['comparator']}; pass rule: {g['rule']}; measured: {g['measured']}")
        parts.append("")

    labels = [r["label"] for r in rows]
    by_label = {label: {d["id"]: d for d in report["records"][label]} for label in labels}
    first = report["records"][labels[0]]
    parts += ["## Per-record exposure (bits) and extraction", "",
              "`*` = extracted greedily, `+` = extracted by sampling only, `~` = extrapolated (skew-normal); "
              "methods: " + ", ".join(f"{label}: {r['exposure_methods']}" for label, r in zip(labels, rows)), ""]
    body = []
    for d in first:
        if not any("exposure" in by_label[label][d["id"]] for label in labels):
            continue
        cells = [d["id"], str(d["k"])]
        for label in labels:
            rec = by_label[label][d["id"]]
            mark = "*" if rec.get("extracted") else "+" if rec.get("sampled_extracted") else ""
            approx = "~" if rec.get("exposure_method") in EXTRAPOLATED_METHODS else ""
            cells.append(approx + _fmt(rec.get("exposure")) + mark)
        body.append(cells)
    parts += [_table(["record", "k"] + labels, body), ""]
    return "\n".join(parts)


def _new_figure(width: float, height: float, ncols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save_figure(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _value(row: dict[str, Any], metric: str, group: str) -> float:
    value = row[metric].get(group)
    return np.nan if value is None else value


def _plot_alpha_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Exposure per k, extraction per k and perplexity against alpha; fixed rows as lines."""
    sweep = sorted((r for r in rows if r["kind"] == "alpha"), key=lambda r: r["alpha"])
    fixed = [r for r in rows if r["kind"] != "alpha"]
    xs = [r["alpha"] for r in sweep]
    groups = _sorted_groups({g for r in rows for g in list(r["exposure_by_k"]) + list(r["extraction_by_k"])})
    styles = ["--", ":", "-."]
    fig, axes = _new_figure(14, 4.2, 3)
    panels = [("exposure_by_k", "exposure (bits)"), ("extraction_by_k", "extraction rate")]
    for ax, (metric, ylabel) in zip(axes, panels):
        for i, g in enumerate(groups):
            color = f"C{i}"
            name = _group_name(g)
            if sweep:
                ax.plot(xs, [_value(r, metric, g) for r in sweep], "o-", color=color, label=name)
            for j, r in enumerate(fixed):
                ax.axhline(_value(r, metric, g), color=color, ls=styles[j % 3], lw=1,
                           label=None if sweep else name if j == 0 else None)
        ax.set_ylabel(ylabel)
    ax = axes[2]
    if sweep:
        ax.plot(xs, [r["perplexity"] for r in sweep], "o-", color="k", label="model")
    for j, r in enumerate(fixed):
        ax.axhline(r["perplexity"], color="gray", ls=styles[j % 3], lw=1, label=r["label"])
    ax.set_ylabel("retain perplexity")
    for ax in axes:
        ax.set_xlabel("alpha")
        if not sweep:
            ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    for j, r in enumerate(fixed):  # explain the line styles once
        axes[0].plot([], [], color="gray", ls=styles[j % 3], label=r["label"])
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("alpha sweep (dashed/dotted: fixed models)")
    _save_figure(fig, path)


def _roc_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """alpha 0 and alpha 1 when present (else every non-reference row), plus the reference."""
    by_alpha = {r["alpha"]: r for r in rows if r["kind"] == "alpha"}
    chosen = [by_alpha[a] for a in (0.0, 1.0) if a in by_alpha]
    if not chosen:
        chosen = [r for r in rows if r["kind"] != "reference"][:4]
    return chosen + [r for r in rows if r["kind"] == "reference"]


def _plot_roc(rows: list[dict[str, Any]], path: Path) -> None:
    names = _score_names(rows)
    fig, axes = _new_figure(4.3 * len(names), 4.2, len(names))
    for ax, name in zip(axes, names):
        for r in _roc_rows(rows):
            m = r["mia"][name]
            style = "--" if r["kind"] == "reference" else "-"
            ax.plot(m["fpr"], m["tpr"], ls=style, label=f"{r['label']} (AUC {m['auc']:.2f})")
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
        ax.set_title(f"MIA score: {SCORE_LABELS[name]}")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    _save_figure(fig, path)


def _plot_auc_alpha(rows: list[dict[str, Any]], path: Path) -> None:
    """Every membership attack's AUC (with its interval) against alpha; fixed rows (the model as
    is, baselines, the reference) as horizontal lines in the attack's colour."""
    names = _score_names(rows)
    sweep = sorted((r for r in rows if r["kind"] == "alpha"), key=lambda r: r["alpha"])
    fixed = [r for r in rows if r["kind"] != "alpha"]
    styles = ["--", ":", "-."]
    fig, (ax,) = _new_figure(7, 4.5, 1)
    for i, name in enumerate(names):
        color = f"C{i}"
        if sweep:
            xs = [r["alpha"] for r in sweep]
            ys = [r["mia"][name]["auc"] for r in sweep]
            ax.plot(xs, ys, "o-", color=color, label=SCORE_LABELS[name])
            cis = [r["mia"][name].get("auc_ci") for r in sweep]
            if all(cis):
                ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], color=color, alpha=0.12, lw=0)
        for j, r in enumerate(fixed):
            ax.axhline(r["mia"][name]["auc"], color=color, ls=styles[j % 3], lw=1,
                       label=None if sweep or j else SCORE_LABELS[name])
    for j, r in enumerate(fixed):  # explain the line styles once
        ax.plot([], [], color="gray", ls=styles[j % 3], label=r["label"])
    ax.axhline(0.5, color="k", lw=0.8, alpha=0.5)
    ax.set_xlabel("alpha")
    ax.set_ylabel("membership AUC (0.5 = chance)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("membership attacks against alpha (band: 95 % interval; lines: fixed models)")
    _save_figure(fig, path)


# --------------------------------------------------------------------------------------
# From paths (for the CLI)
# --------------------------------------------------------------------------------------


def load_any_model(path: str) -> tuple[torch.nn.Module, Any]:
    """A libortho artifact (``libortho.load``, ortho stream included when present) or a plain
    local HF folder / .gguf file (``libortho.load_model``). Raises ``ArtifactError`` (a
    ``ValueError``) with the reason when it cannot be loaded."""
    from libortho import modelio

    if modelio.is_artifact(path):
        return modelio.load(path)
    return modelio.load_model(path)


def _require_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} not found: {p}")
    return p


def audit_from_paths(
    model_path: str | os.PathLike,
    members_path: str | os.PathLike,
    nonmembers_path: str | os.PathLike,
    public_text_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    alphas: str | Sequence[AlphaSpec] | None = None,
    reference_path: str | os.PathLike | None = None,
    public_model_path: str | os.PathLike | None = None,
    load_model: ModelLoader | None = None,
    **audit_kwargs: Any,
) -> dict[str, Any]:
    """Load everything from disk, run :func:`audit`, write the report into ``out_dir``.

    ``members_path`` / ``nonmembers_path``: JSONL canary records; ``public_text_path``: UTF-8
    held-out public text; ``alphas``: e.g. ``"0,0.25,0.5,0.75,1"`` or ``None`` (model as is);
    ``load_model(path) -> (model, tokenizer)`` defaults to :func:`load_any_model`.
    ``public_model_path``: the public checkpoint P, for the P-calibrated membership attack; it is
    loaded first, scored on every record once, and freed before the audited model is loaded.
    Bad inputs raise ``ValueError`` naming the file (and line, for records).
    """
    parsed_alphas = parse_alphas(alphas)
    members = P.load_records(_require_file(members_path, "members file"))
    nonmembers = P.load_records(_require_file(nonmembers_path, "non-members file"))
    if not members:
        raise ValueError(f"members file has no records: {members_path}")
    if not nonmembers:
        raise ValueError(f"non-members file has no records: {nonmembers_path}")
    text_file = _require_file(public_text_path, "public text file")
    try:
        public_text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"public text file is not UTF-8: {text_file} ({exc})") from None
    if not public_text.strip():
        raise ValueError(f"public text file is empty: {text_file}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a folder: {out}")
    for path, what in ((model_path, "model"), (reference_path, "reference model"), (public_model_path, "public model")):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{what} not found: {path}")

    loader = load_model or load_any_model
    if public_model_path is not None and audit_kwargs.get("public_losses") is None:
        public, public_tok = loader(str(public_model_path))
        audit_kwargs["public_losses"] = public_record_losses(
            public, public_tok, members, nonmembers, audit_kwargs.get("text_batch_size", 16))
        del public, public_tok
        import gc

        gc.collect()
    model, tokenizer = loader(str(model_path))
    reference, reference_tokenizer = (None, None)
    if reference_path is not None:
        reference, reference_tokenizer = loader(str(reference_path))
    return audit(
        model, tokenizer, public_text, members, nonmembers,
        alphas=parsed_alphas, reference=reference, out_dir=out,
        reference_tokenizer=reference_tokenizer, **audit_kwargs,
    )
