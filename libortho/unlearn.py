"""Fine-tuning-based unlearning baselines, for comparison with the alpha switch.

* :func:`unlearn` -- NPO + RT (Zhang et al. 2024, "Negative Preference Optimization"): on each
  forget text y the loss is ``-(2/beta) * log sigmoid(-beta * (log p_theta(y) - log p_ref(y)))``,
  log p summed over the text's tokens, p_ref the model before unlearning; plus ``retain_weight``
  times the mean token NLL of public (retain) text windows. ``method="graddiff"``: gradient
  difference, minus the forget texts' mean token NLL plus the same retain term. The options of a
  run (method, learning rate, steps, seed, batches, ...) are one :class:`UnlearnConfig`.
* :func:`unlearning_sweep` / :func:`choose_point` / :func:`select_unlearning` -- the stopping
  rule: a short sweep of learning rates, evaluated every few steps; the chosen point is the one
  whose forget-set exposure reaches the retrain reference's level while retain perplexity stays
  within ``max_ppl_ratio`` x the fine-tuned model's, else the best point (see :func:`choose_point`).

Training follows :func:`libortho.scenario.finetune`: AdamW on the weights of the decoder blocks'
linear layers only (embeddings, norms, lm_head and biases stay frozen), dropout off, gradient
clipping, seeded; it runs on the model's device (CPU is fine for small models).
Units: NLL and log-probabilities in nats, exposure in bits, learning rates per AdamW step.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import privacy as P
from .audit.schema import MEASURED_METHODS
from .hf_model import pad_token_id
from .lm import next_token_nll, sequences_nll
from .records import CanaryRecord
from .scenario import ScenarioConfig, frozen_trainable_weights, public_windows, text_ids

__all__ = [
    "METHODS",
    "UnlearnConfig",
    "UnlearnLog",
    "unlearn",
    "forget_exposure",
    "SweepPoint",
    "choose_point",
    "unlearning_sweep",
    "UnlearnSelection",
    "select_unlearning",
]

METHODS = ("npo", "graddiff")
StepCallback = Callable[[int, nn.Module], None]
REF_BATCH = 16  # forget texts per forward pass when NPO's reference log-probabilities are computed


@dataclass(frozen=True)
class UnlearnConfig:
    """The optimisation options of one unlearning run (:func:`unlearn`); plain data, checked on creation.

    ``method``: ``npo`` or ``graddiff``. ``lr``: the constant AdamW learning rate; ``steps``: AdamW
    steps; ``seed``: the data order and torch's random state. ``beta``: NPO's inverse temperature.
    ``retain_weight``: the weight of the retain term (mean token NLL of ``retain_batch`` windows of
    ``seq_len`` tokens per step). ``forget_batch``: forget texts per step (None = all; else a
    seeded shuffle, cycled). ``train_blocks``: the decoder blocks whose linear weights train (None =
    all, an int n = the last n blocks, a tuple = block indices). ``grad_clip``: the gradient-norm
    clip (0 = none).
    """

    method: str = "npo"
    lr: float = 1e-5
    steps: int = 30
    seed: int = 0
    beta: float = 0.1
    retain_weight: float = 1.0
    seq_len: int = ScenarioConfig.seq_len  # the retain term trains on windows like the fine-tune's
    retain_batch: int = ScenarioConfig.batch
    forget_batch: int | None = None
    train_blocks: int | tuple[int, ...] | None = None
    grad_clip: float = ScenarioConfig.grad_clip

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown unlearning method {self.method!r}; expected one of {', '.join(METHODS)}")
        _require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(self.retain_weight >= 0, f"retain_weight must be >= 0, got {self.retain_weight}")
        _require(self.seq_len >= 2, f"seq_len must be >= 2 (one next-token target), got {self.seq_len}")
        _require(self.retain_batch >= 1, f"retain_batch must be >= 1, got {self.retain_batch}")
        _require(self.forget_batch is None or self.forget_batch >= 1,
                 f"forget_batch must be >= 1 or None (all forget texts), got {self.forget_batch}")
        _require(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        object.__setattr__(self, "train_blocks", _blocks(self.train_blocks))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _blocks(blocks: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    # A tuple, so that the frozen config stays hashable and compares by value.
    if blocks is None:
        return None
    if isinstance(blocks, (list, tuple)):
        return tuple(int(b) for b in blocks)
    _require(not isinstance(blocks, bool) and int(blocks) >= 1, f"train_blocks as an int must be >= 1, got {blocks!r}")
    return int(blocks)


@dataclass
class UnlearnLog:
    """Per-step losses of one unlearning run (forget term, retain mean token NLL) and its cost."""

    method: str
    lr: float
    steps: int
    forget_loss: list[float] = field(default_factory=list)
    retain_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained_parameters: int = 0


def unlearn(
    model: nn.Module,
    tokenizer: Any,
    forget_texts: Sequence[str],
    retain_text: str,
    config: UnlearnConfig = UnlearnConfig(),
    *,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> UnlearnLog:
    """Unlearn ``forget_texts`` from ``model`` in place, with the options of ``config``.

    Each forget text is trained on as ``tokenizer(text) + [EOS]``, the sequence the fine-tune saw
    (:func:`libortho.scenario.text_ids`). Per step: ``config.forget_batch`` forget texts and
    ``config.retain_batch`` windows of ``config.seq_len`` tokens of ``retain_text`` in a seeded
    order. NPO's reference log-probabilities are those of ``model`` as passed in, computed once
    before the first step (no second model is held). ``callback(step, model)`` runs after every
    step (``step`` = steps done, 1-based) with the model in eval mode and no gradients required,
    e.g. to measure a checkpoint. A run of s steps equals the first s steps of a longer run with
    the same options.
    """
    if not forget_texts:
        raise ValueError("no forget texts given")
    from tqdm.auto import tqdm

    schedule = ScenarioConfig(seed=config.seed, steps=config.steps, seq_len=config.seq_len, batch=config.retain_batch,
                              warmup_steps=0)
    windows = public_windows(tokenizer, schedule, text=retain_text)  # [steps, retain_batch, seq_len]
    seqs = [text_ids(tokenizer, t) for t in forget_texts]
    pad_id = pad_token_id(tokenizer)
    params = frozen_trainable_weights(model, config.train_blocks)
    model.eval()
    device = params[0].device
    ref_nll = _reference_nll(model, seqs, pad_id, device)
    batches = _forget_batches(len(seqs), config.forget_batch, config.seed)

    log = UnlearnLog(config.method, config.lr, config.steps, trained_parameters=int(sum(p.numel() for p in params)))
    t0 = time.perf_counter()
    _set_trainable(params, True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        try:
            for step in tqdm(range(config.steps), desc=f"unlearn ({config.method}, lr {config.lr:g})",
                             disable=not progress, unit="step"):
                chosen = next(batches)
                nll, n_tok = sequences_nll(model, [seqs[i] for i in chosen], pad_id, device, per_sequence=True)
                forget = _forget_term(config, nll, n_tok, ref_nll[chosen])
                batch = windows[step].to(device)
                retain = next_token_nll(model, batch) / (batch.shape[0] * (batch.shape[1] - 1))
                loss = forget + config.retain_weight * retain
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                log.forget_loss.append(round(float(forget.detach()), 5))
                log.retain_loss.append(round(float(retain.detach()), 5))
                if callback is not None:
                    _call_frozen(callback, step + 1, model, params)
        finally:
            _set_trainable(params, False)
            opt.zero_grad(set_to_none=True)
    log.seconds = round(time.perf_counter() - t0, 2)
    return log


@torch.no_grad()
def _reference_nll(model: nn.Module, seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """log p_ref(y) of every forget text (as an NLL [n] in nats), under the model before unlearning."""
    return torch.cat([sequences_nll(model, seqs[i : i + REF_BATCH], pad_id, device, per_sequence=True)[0]
                      for i in range(0, len(seqs), REF_BATCH)])


def _forget_batches(n: int, forget_batch: int | None, seed: int) -> Iterator[list[int]]:
    """Indices of the forget texts of each step: all of them, or ``forget_batch`` at a time from
    seeded shuffles of all n, one after the other."""
    per_step = n if forget_batch is None else min(forget_batch, n)
    rng = random.Random(f"libortho.unlearn.forget:{seed}")
    order: list[int] = []
    while True:
        while len(order) < per_step:
            epoch = list(range(n))
            rng.shuffle(epoch)
            order.extend(epoch)
        chosen, order = order[:per_step], order[per_step:]
        yield chosen


def _forget_term(config: UnlearnConfig, nll: torch.Tensor, n_tok: int, ref_nll: torch.Tensor) -> torch.Tensor:
    """The forget loss of one step from the chosen texts' NLL [b] (and their reference NLL [b])."""
    if config.method == "npo":
        delta = ref_nll.to(nll.device) - nll  # log p_theta - log p_ref
        return -(2.0 / config.beta) * nn.functional.logsigmoid(-config.beta * delta).mean()
    return -nll.sum() / n_tok


def _set_trainable(params: Sequence[nn.Parameter], on: bool) -> None:
    for p in params:
        p.requires_grad_(on)


def _call_frozen(callback: StepCallback, step: int, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    # The callback measures a checkpoint: no gradients, and training resumes afterwards.
    _set_trainable(params, False)
    try:
        callback(step, model)
    finally:
        _set_trainable(params, True)


# --------------------------------------------------------------------------------------
# Stopping rule
# --------------------------------------------------------------------------------------


def forget_exposure(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    seed: int = 0,
    **exposure_options: Any,
) -> float:
    """Mean exposure (bits) over ``records`` from measured ranks only (skew-normal extrapolations
    are left out); NaN when no record's rank was measured. ``exposure_options`` go to
    :func:`libortho.privacy.exposure` (``n_samples``, ``frontier_cap``, ``batch_size``, ...).
    Candidates are seeded per record, so every checkpoint is scored against the same ones (those
    the audit uses for the same seed)."""
    values = []
    for r in records:
        res = P.exposure(model, tokenizer, r, rng=P.record_rng(seed, r.id), **exposure_options)
        if res.method in MEASURED_METHODS:  # ranks observed, not fitted
            values.append(res.exposure)
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class SweepPoint:
    """One checkpoint of the sweep: learning rate, steps done (0 = the model before unlearning),
    mean measured forget-set exposure (bits) and retain perplexity."""

    lr: float
    steps: int
    forget_exposure: float
    perplexity: float


MAX_PPL_RATIO = 1.05  # the stopping rule's perplexity bound, x the fine-tuned model's
TOLERANCE_BITS = 0.0  # how far above the retrain reference's exposure still counts as reached


def choose_point(
    points: Sequence[SweepPoint],
    reference_exposure: float,
    fp_perplexity: float,
    max_ppl_ratio: float = MAX_PPL_RATIO,
    tolerance_bits: float = TOLERANCE_BITS,
) -> tuple[SweepPoint, str]:
    """The stopping rule: (chosen point, why).

    1. Points with perplexity <= ``max_ppl_ratio`` x ``fp_perplexity`` whose forget exposure is at
       most ``reference_exposure + tolerance_bits``: the one with the lowest perplexity (least
       utility lost; ties: fewer steps, lower lr) -- "reached".
    2. Else, among points within the perplexity bound, the lowest forget exposure -- "best within
       perplexity bound".
    3. Else (no point within the bound) the lowest perplexity -- "no point within perplexity bound".
    """
    if not points:
        raise ValueError("no sweep points")
    bound = max_ppl_ratio * fp_perplexity
    ok = [p for p in points if p.perplexity <= bound]
    reached = [p for p in ok if p.forget_exposure <= reference_exposure + tolerance_bits]
    if reached:
        return min(reached, key=lambda p: (p.perplexity, p.steps, p.lr)), "reached"
    if ok:
        return min(ok, key=lambda p: (p.forget_exposure, p.perplexity, p.steps)), "best within perplexity bound"
    return min(points, key=lambda p: (p.perplexity, p.steps)), "no point within perplexity bound"


Measure = Callable[[nn.Module], tuple[float, float]]  # model -> (forget exposure bits, retain perplexity)


def unlearning_sweep(
    load_model: Callable[[], nn.Module],
    tokenizer: Any,
    forget_texts: Sequence[str],
    retain_text: str,
    measure: Measure,
    config: UnlearnConfig = UnlearnConfig(),
    lrs: Sequence[float] = (1e-5, 3e-5, 1e-4),
    eval_every: int = 10,
) -> list[SweepPoint]:
    """Unlearn a fresh copy (``load_model()``, one model in memory at a time) per learning rate:
    ``config`` with its ``lr`` replaced by each of ``lrs``, measured every ``eval_every`` steps and
    at the end (``config.steps``); the untouched model is measured once as the step-0 point (lr 0).
    ``measure(model) -> (forget exposure, retain perplexity)``."""
    model = load_model()
    exp0, ppl0 = measure(model)
    points = [SweepPoint(0.0, 0, exp0, ppl0)]
    del model
    for lr in lrs:
        model = load_model()

        def checkpoint(step: int, m: nn.Module, lr: float = lr) -> None:
            if step % eval_every == 0 or step == config.steps:
                e, p = measure(m)
                points.append(SweepPoint(lr, step, e, p))

        unlearn(model, tokenizer, forget_texts, retain_text, replace(config, lr=lr), callback=checkpoint)
        del model
    return points


@dataclass
class UnlearnSelection:
    """The model unlearned at the chosen point, with the whole sweep (plain data in ``summary()``)."""

    model: nn.Module
    point: SweepPoint
    reason: str
    points: list[SweepPoint]
    log: UnlearnLog | None

    def summary(self) -> dict[str, Any]:
        return {"chosen": asdict(self.point), "reason": self.reason, "points": [asdict(p) for p in self.points],
                "log": None if self.log is None else asdict(self.log)}


def select_unlearning(
    load_model: Callable[[], nn.Module],
    tokenizer: Any,
    forget_texts: Sequence[str],
    retain_text: str,
    measure: Measure,
    reference_exposure: float,
    fp_perplexity: float,
    config: UnlearnConfig = UnlearnConfig(),
    *,
    max_ppl_ratio: float = MAX_PPL_RATIO,
    tolerance_bits: float = TOLERANCE_BITS,
    **sweep_options: Any,
) -> UnlearnSelection:
    """Sweep (:func:`unlearning_sweep` with ``config`` and ``sweep_options``: ``lrs``,
    ``eval_every``), apply the stopping rule (:func:`choose_point`), and re-run ``config`` with the
    chosen (lr, steps) on a fresh copy; runs are deterministic, so the returned model is the
    measured checkpoint."""
    points = unlearning_sweep(load_model, tokenizer, forget_texts, retain_text, measure, config, **sweep_options)
    point, reason = choose_point(points, reference_exposure, fp_perplexity, max_ppl_ratio, tolerance_bits)
    model = load_model()
    log = None
    if point.steps > 0:
        log = unlearn(model, tokenizer, forget_texts, retain_text, replace(config, lr=point.lr, steps=point.steps))
    return UnlearnSelection(model, point, reason, points, log)

