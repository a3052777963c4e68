"""Options of an audit run (:class:`AuditConfig`) and the alphas they name.

Every option :func:`libortho.audit.audit` takes besides the model, tokenizer, public text and
records; a bad value fails here, when the options are built, before any model runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch

from ..evaluation import PERPLEXITY_WINDOW
from ..privacy.exposure_rank import EXPOSURE_CANDIDATES, FRONTIER_CAP
from ..privacy.extraction import Sampling
from ..privacy.forward import CANDIDATE_BATCH_SIZE, TEXT_BATCH_SIZE
from ..switch import AlphaError, parse_alpha

__all__ = ["AuditConfig", "parse_alphas", "AlphaSpec", "AlphaScope", "PerplexityFn"]

AlphaSpec = float | str | None
PerplexityFn = Callable[..., float]
AlphaScope = Callable[[torch.nn.Module, float], ContextManager[Any]]


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
            value = parse_alpha(item, "an alpha", text=True)
        except AlphaError as err:
            raise ValueError(f"bad alpha {item!r}: {err}, or 'fp' (the model as is)") from None
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


@dataclass
class AuditConfig:
    """How to audit: the alphas, the comparison models, the attacks' budgets, the outputs.

    ``alphas``: conditions of the audited model (``None``/"fp" = as is; default: the model as is
    only). Each numeric alpha is applied with the scoped ``libortho.alpha(model, a)`` (or
    ``alpha_scope``); a plain model cannot take one: use ``alphas=None`` there. ``reference``:
    the retrain reference (``reference_tokenizer`` when its tokenizer differs), the comparator of
    the KS test. ``baselines``: further models evaluated as they are, one row each, by label ->
    (model, tokenizer), e.g. ``{"fp": (finetuned_fp_model, tok)}``; they are listed first. The
    reference and each baseline may also be given as a zero-argument loader (returning the model,
    resp. (model, tokenizer)): the audit then opens each only for its own row and drops it after,
    so at most one of them is in memory next to the audited model.
    ``out_dir``: where the report files go (None = no files).

    ``exposure_candidates`` is the random sample size for the sampled / skew-normal exposure
    estimates; ``frontier_cap`` bounds the digit-trie search (see :func:`libortho.privacy.exposure`).
    ``exposure_nonmembers``: measure exposure of the non-members too. ``extra_settings`` (e.g.
    ortho density, bits per parameter) is copied into the report's settings. ``batch_size``:
    candidates / trie nodes per forward; ``text_batch_size``: records per forward for
    extraction and membership scores. ``perplexity_window`` / ``perplexity_max_windows``: token
    windows of the retain perplexity (``perplexity_fn``, default
    :func:`libortho.evaluation.perplexity`). ``seed``: the random candidates and samples, the same
    for a record under every condition. ``white_box``: also measure the norm of the members'
    secret-loss gradient w.r.t. the decoder's linear weights
    (:func:`libortho.privacy.canary_gradient_norm`). ``exposure_formats``: measure exposure only for
    records whose secret format is of these kinds (e.g. ``("digits",)``); None = every record.

    Public-model calibration (score ``"ref"``): the record's loss under each condition minus its
    loss under the public model P. Pass ``public_losses`` (record id -> mean token NLL under P,
    from :func:`libortho.privacy.record_losses`, e.g. cached from an earlier audit's
    ``report["public_losses"]``), or ``public_model`` (and ``public_tokenizer`` when P's
    tokenizer differs): its losses are computed once, before any condition, so the caller may
    free P afterwards. ``sample_extraction``: samples per record prefix for extraction by
    sampling (temperature ``sample_temperature``, top-k ``sample_top_k``; 0 = greedy only), of the
    members and, with ``sample_nonmembers``, the non-members too (a false-positive control).
    Sampling costs a forward of ``sample_extraction`` rows per generated token (SmolLM2-135M on an
    idle 2-core CPU: about 3 s per record at 64 samples; on a CPU consider sampling members only,
    at the conditions that matter). Off (0) by default here for that cost; ``libortho audit``
    samples 64 by default.
    ``sample_conditions``: the labels of the conditions to sample (e.g. ``("alpha=0",)``; labels
    as in the report: ``alpha=0``, ``model``, a baseline's label, ``reference``); None = every one.
    ``goals``: add the pass/fail goal lines of :func:`libortho.goals.evaluate_goals`.
    ``progress``: show progress bars.
    """

    alphas: Sequence[AlphaSpec] | None = None
    reference: torch.nn.Module | Callable[[], torch.nn.Module] | None = None
    out_dir: str | os.PathLike | None = None
    exposure_candidates: int = EXPOSURE_CANDIDATES
    progress: bool = True
    reference_tokenizer: Any = None
    frontier_cap: int = FRONTIER_CAP
    exposure_nonmembers: bool = False
    perplexity_window: int = PERPLEXITY_WINDOW
    perplexity_max_windows: int | None = None
    seed: int = 0
    batch_size: int = CANDIDATE_BATCH_SIZE
    text_batch_size: int = TEXT_BATCH_SIZE
    alpha_scope: AlphaScope | None = None
    perplexity_fn: PerplexityFn | None = None
    extra_settings: dict[str, Any] | None = None
    baselines: dict[str, tuple[torch.nn.Module, Any] | Callable[[], tuple[torch.nn.Module, Any]]] | None = None
    white_box: bool = True
    exposure_formats: Sequence[str] | None = None
    public_model: torch.nn.Module | None = None
    public_tokenizer: Any = None
    public_losses: dict[str, float] | None = None
    sample_extraction: int = 0
    sample_top_k: int = Sampling.top_k
    sample_temperature: float = Sampling.temperature
    sample_nonmembers: bool = True
    sample_conditions: Sequence[str] | None = None
    goals: bool = True

    def __post_init__(self) -> None:
        self.conditions()  # a bad or repeated alpha fails now, not after the first condition
        if self.sample_extraction < 0:
            raise ValueError(f"sample_extraction must be >= 0, got {self.sample_extraction}")
        # Copies, so that a caller changing its own list or dict later cannot change the run.
        self.exposure_formats = None if self.exposure_formats is None else tuple(self.exposure_formats)
        self.public_losses = None if self.public_losses is None else dict(self.public_losses)
        self.sample_extraction = int(self.sample_extraction)
        self.sample_top_k = int(self.sample_top_k)
        self.sample_temperature = float(self.sample_temperature)
        self.sample_nonmembers = bool(self.sample_nonmembers)
        if isinstance(self.sample_conditions, str):
            raise ValueError(f"sample_conditions must be a list of labels, got the string {self.sample_conditions!r}")
        self.sample_conditions = None if self.sample_conditions is None else tuple(self.sample_conditions)
        unknown = [c for c in self.sample_conditions or () if c not in self.labels()]
        if unknown:
            raise ValueError(f"sample_conditions names no condition of this audit: {unknown}; "
                             f"its conditions are {self.labels()}")

    def samples(self, label: str) -> bool:
        """Whether the condition ``label`` gets extraction by sampling."""
        return bool(self.sample_extraction) and (self.sample_conditions is None or label in self.sample_conditions)

    def conditions(self) -> list[tuple[str, float | None]]:
        """(label, alpha) per condition of the audited model; alpha None = the model as is."""
        return _conditions(self.alphas)

    def labels(self) -> list[str]:
        """Every row's label, in report order: the baselines, the audited model's conditions, the reference."""
        return (list(self.baselines or {}) + [label for label, _ in self.conditions()]
                + (["reference"] if self.reference is not None else []))
