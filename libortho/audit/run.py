"""The audit driver: every condition of a model, the reference and the baselines, into one report.

For each condition (each alpha of a LibOrtho model, or the model as is, and the retrain
reference) :func:`audit` measures retain perplexity, canary exposure, greedy and sampled
extraction per insertion count k, membership inference and the KS forget-quality test against
the reference (:mod:`.measure`), then writes the report files (:mod:`.report`).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import goals as G
from .. import privacy as P
from ..memory import release_freed_memory
from ..records import CanaryRecord
from .config import AlphaScope, AuditConfig, PerplexityFn
from .measure import _evaluate_condition, public_record_losses
from .report import write_report

__all__ = ["audit"]


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


def _opened(spec: Any) -> Any:
    """A comparison model as given, or opened now by its zero-argument loader: loaders let the
    audit hold one comparison model at a time, each dropped once its row is measured."""
    return spec if isinstance(spec, (torch.nn.Module, tuple, list)) else spec()


def _make_config(config: AuditConfig | None, options: dict[str, Any]) -> AuditConfig:
    """The run's options: ``config`` (default: all defaults) with ``options`` replacing its fields."""
    if config is not None and not isinstance(config, AuditConfig):
        raise TypeError(f"config must be an AuditConfig, got {type(config).__name__} (pass options by keyword)")
    unknown = sorted(set(options) - {f.name for f in fields(AuditConfig)})
    if unknown:
        raise TypeError(f"audit() got unexpected keyword argument(s): {', '.join(unknown)}")
    if config is None:
        return AuditConfig(**options)
    return replace(config, **options) if options else config


def audit(
    model: torch.nn.Module,
    tokenizer: Any,
    public_text: str,
    members: Sequence[CanaryRecord],
    nonmembers: Sequence[CanaryRecord],
    config: AuditConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Audit ``model`` at each alpha (``None``/"fp" = as is), the baselines and the reference model.

    ``public_text``: held-out public text for the retain perplexity; ``members`` /
    ``nonmembers``: the canary records trained / never trained (ids unique across both).
    Options: a :class:`~libortho.audit.config.AuditConfig`, or its fields as keywords (e.g.
    ``alphas=[0, 1], reference=ref, out_dir="out"``); keywords given next to a config replace
    its fields.

    Puts the models in eval mode. Each numeric alpha is applied with a scope, so the model's
    own alpha is untouched afterwards; every alpha is checked before anything runs
    (``ValueError`` for a plain model: use ``alphas=None`` there).

    Returns the report (plain data, as written to ``report.json``): ``settings``, ``rows``
    (one summary per condition, reference last), ``records`` (per-record details by label),
    ``public_losses`` (or None) and ``goals`` (when asked for).
    """
    if not public_text or not public_text.strip():
        raise ValueError("public_text is empty")
    _validate_records(members, nonmembers)
    cfg = _make_config(config, options)
    conditions = cfg.conditions()
    public_losses = cfg.public_losses
    if public_losses is None and cfg.public_model is not None:
        public_losses = public_record_losses(cfg.public_model, cfg.public_tokenizer or tokenizer, members, nonmembers,
                                             cfg.text_batch_size)
    cfg = replace(cfg, perplexity_fn=_resolve_perplexity(cfg.perplexity_fn), public_losses=public_losses)
    if public_losses is not None:  # fail before the long run, naming the records P's losses lack
        P.public_losses_for(public_losses, list(members) + list(nonmembers))
    scope = _resolve_alpha_scope(cfg.alpha_scope) if any(a is not None for _, a in conditions) else None
    if scope is not None:
        _check_alphas(model, conditions, scope)

    rows: list[dict[str, Any]] = []
    records: dict[str, list[dict[str, Any]]] = {}
    reference_row = None
    reference_losses = None
    reference = cfg.reference
    baselines = cfg.baselines or {}
    steps = tqdm(total=len(conditions) + (reference is not None) + len(baselines), desc="audit", disable=not cfg.progress)
    if reference is not None:
        # The reference goes first: every other row's KS test compares against its losses.
        steps.set_postfix_str("reference")
        reference_model = _opened(reference).eval()
        reference_row, records["reference"] = _evaluate_condition(
            reference_model, cfg.reference_tokenizer or tokenizer, "reference", "reference", None,
            public_text, members, nonmembers, None, cfg,
        )
        del reference_model
        release_freed_memory()
        reference_losses = np.array([d["loss"] for d in records["reference"] if d["member"]])
        reference_row["ks_vs_reference"] = asdict(P.forget_quality(reference_losses, reference_losses))
        steps.update()

    for label, spec in baselines.items():
        steps.set_postfix_str(label)
        base_model, base_tok = _opened(spec)
        row, records[label] = _evaluate_condition(
            base_model.eval(), base_tok or tokenizer, label, "model", None,
            public_text, members, nonmembers, reference_losses, cfg,
        )
        del base_model
        release_freed_memory()
        rows.append(row)
        steps.update()

    model.eval()
    for label, alpha in conditions:
        steps.set_postfix_str(label)
        with nullcontext() if alpha is None else scope(model, alpha):
            row, records[label] = _evaluate_condition(
                model, tokenizer, label, "model" if alpha is None else "alpha", alpha,
                public_text, members, nonmembers, reference_losses, cfg,
            )
        rows.append(row)
        release_freed_memory()
        steps.update()
    steps.close()
    if reference_row is not None:
        rows.append(reference_row)

    report = {
        "settings": _settings(members, nonmembers, public_text, cfg),
        "rows": rows,
        "records": records,
        "public_losses": cfg.public_losses,
    }
    report = _plain(report)
    if cfg.goals:
        report["goals"] = G.evaluate_goals(report)
    if cfg.out_dir is not None:
        write_report(report, cfg.out_dir)
    return report


def _settings(
    members: Sequence[CanaryRecord], nonmembers: Sequence[CanaryRecord], public_text: str, cfg: AuditConfig,
) -> dict[str, Any]:
    import transformers

    counts: dict[str, int] = defaultdict(int)
    for r in members:
        counts[str(r.k)] += 1
    settings = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "conditions": cfg.labels(),
        "n_members": len(members),
        "n_nonmembers": len(nonmembers),
        "members_per_k": dict(counts),
        "secret_formats": sorted({r.secret_format for r in list(members) + list(nonmembers)}),
        "public_text_chars": len(public_text),
        "perplexity_window": cfg.perplexity_window,
        "perplexity_max_windows": cfg.perplexity_max_windows,
        "exposure_candidates": cfg.exposure_candidates,
        "frontier_cap": cfg.frontier_cap,
        "exposure_nonmembers": cfg.exposure_nonmembers,
        "seed": cfg.seed,
        "min_k_fraction": 0.2,
        "public_model_calibration": cfg.public_losses is not None,
        "sample_extraction": (
            {"samples": cfg.sample_extraction, "temperature": cfg.sample_temperature,
             "top_k": cfg.sample_top_k, "tokens": "secret tokens + 4", "rule": "any sample contains the secret",
             "nonmembers": cfg.sample_nonmembers,
             "conditions": "all" if cfg.sample_conditions is None else list(cfg.sample_conditions)}
            if cfg.sample_extraction else None),
        "tie_rule": "candidates within the tie tolerance of the secret count half a rank",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    settings.update(cfg.extra_settings or {})
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
