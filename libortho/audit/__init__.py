"""``libortho audit``: privacy and quality of a model over an alpha sweep, plus a report.

For each condition (each alpha of a LibOrtho model, or the model as is, and the retrain
reference) it measures retain perplexity, canary exposure, greedy and sampled extraction per
insertion count k, membership inference (loss / zlib / Min-K%, and loss calibrated by the public
model P when P or its per-record losses are given; AUC with its interval and the TPR at the
lowest FPR the non-members resolve) and the KS forget-quality test against the reference, then
writes ``report.json``, ``report.md``, ``alpha_sweep.png``, ``roc.png`` and ``auc_alpha.png``.

* :mod:`.config`: :class:`AuditConfig`, every option of a run; :func:`parse_alphas`.
* :mod:`.run`: :func:`audit`, the driver; :mod:`.measure`: one condition's measurements.
* :mod:`.report` / :mod:`.plots`: the report files and figures; :mod:`.schema`: their names.
* :mod:`.paths`: :func:`audit_from_paths` and :func:`load_any_model`, for the CLI.
"""

from __future__ import annotations

from .config import AlphaScope, AlphaSpec, AuditConfig, PerplexityFn, parse_alphas  # noqa: F401 (re-exported)
from .measure import mia_summary, public_record_losses  # noqa: F401 (re-exported)
from .paths import ModelLoader, audit_from_paths, load_any_model  # noqa: F401 (re-exported)
from .report import render_markdown, write_report  # noqa: F401 (re-exported)
from .run import audit  # noqa: F401 (re-exported)
from .schema import (  # noqa: F401 (re-exported)
    EXTRAPOLATED_METHODS,
    MEASURED_METHODS,
    MIA_SCORES,
    NONMEMBER_GROUP,
    REFERENCE_SCORE,
    SCORE_LABELS,
)

__all__ = [
    "audit", "audit_from_paths", "public_record_losses", "mia_summary", "parse_alphas", "load_any_model",
    "write_report", "render_markdown", "AuditConfig",
]
