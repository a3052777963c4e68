"""Fine-tuning-based unlearning baselines, for comparison with the alpha switch.

* :func:`unlearn` -- NPO + RT (Zhang et al. 2024, "Negative Preference Optimization"): on each
  forget text y the loss is ``-(2/beta) * log sigmoid(-beta * (log p_theta(y) - log p_ref(y)))``,
  log p summed over the text's tokens, p_ref the model before unlearning; plus ``retain_weight``
  times the mean token NLL of public (retain) text windows. ``method="graddiff"``: gradient
  difference, minus the forget texts' mean token NLL plus the same retain term.
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
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

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
    lr: float = 1e-5,
    steps: int = 30,
    seed: int = 0,
    *,
    method: str = "npo",
    beta: float = 0.1,
    retain_weight: float = 1.0,
    seq_len: int = 192,
    retain_batch: int = 1,
    forget_batch: int | None = None,
    train_blocks: int | Sequence[int] | None = None,
    grad_clip: float = 1.0,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> UnlearnLog:
    """Unlearn ``forget_texts`` from ``model`` in place (constant learning rate ``lr``, ``steps`` steps).

    Each forget text is trained on as ``tokenizer(text) + [EOS]``, the sequence the fine-tune saw
    (:func:`libortho.scenario.text_ids`). Per step: ``forget_batch`` forget texts (None = all; else
    a seeded shuffle, cycled) and ``retain_batch`` windows of ``seq_len`` tokens of ``retain_text``
    in a seeded order. NPO's reference log-probabilities are those of ``model`` as passed in,
    computed once before the first step (no second model is held). ``callback(step, model)`` runs
    after every step (``step`` = steps done, 1-based) with the model in eval mode and no gradients
    required, e.g. to measure a checkpoint. A run of s steps equals the first s steps of a longer
    run with the same arguments.
    """
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; expected one of {', '.join(METHODS)}")
    if not forget_texts:
        raise ValueError("no forget texts given")
    if steps < 1 or not lr > 0 or not beta > 0:
        raise ValueError(f"steps must be >= 1 and lr, beta > 0; got steps={steps}, lr={lr}, beta={beta}")
    from tqdm.auto import tqdm

    config = ScenarioConfig(seed=seed, steps=steps, seq_len=seq_len, batch=retain_batch, warmup_steps=0)
    windows = public_windows(tokenizer, config, text=retain_text)  # [steps, retain_batch, seq_len]
    seqs = [text_ids(tokenizer, t) for t in forget_texts]
    pad_id = pad_token_id(tokenizer)
    per_step = len(seqs) if forget_batch is None else max(1, min(forget_batch, len(seqs)))
    rng = random.Random(f"libortho.unlearn.forget:{seed}")
    order: list[int] = []

    params = frozen_trainable_weights(model, train_blocks)
    model.eval()
    device = params[0].device

    with torch.no_grad():  # log p_ref(y) per forget text, once
        ref_nll = torch.cat([sequences_nll(model, seqs[i : i + 16], pad_id, device, per_sequence=True)[0] for i in range(0, len(seqs), 16)])

    log = UnlearnLog(method, lr, steps, trained_parameters=int(sum(p.numel() for p in params)))
    t0 = time.perf_counter()
    for p in params:
        p.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        try:
            for step in tqdm(range(steps), desc=f"unlearn ({method}, lr {lr:g})", disable=not progress, unit="step"):
                while len(order) < per_step:
                    epoch = list(range(len(seqs)))
                    rng.shuffle(epoch)
                    order.extend(epoch)
                chosen, order = order[:per_step], order[per_step:]
                nll, n_tok = sequences_nll(model, [seqs[i] for i in chosen], pad_id, device, per_sequence=True)
                if method == "npo":
                    # log p_theta - log p_ref = ref_nll - nll
                    delta = ref_nll[chosen].to(nll.device) - nll
                    forget = -(2.0 / beta) * nn.functional.logsigmoid(-beta * delta).mean()
                else:
                    forget = -nll.sum() / n_tok
                batch = windows[step].to(device)
                retain = next_token_nll(model, batch) / (batch.shape[0] * (batch.shape[1] - 1))
                loss = forget + retain_weight * retain
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                log.forget_loss.append(round(float(forget.detach()), 5))
                log.retain_loss.append(round(float(retain.detach()), 5))
                if callback is not None:
                    for p in params:
                        p.requires_grad_(False)
                    try:
                        callback(step + 1, model)
                    finally:
                        for p in params:
                            p.requires_grad_(True)
        finally:
            for p in params:
                p.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
    log.seconds = round(time.perf_counter() - t0, 2)
    return log


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


def choose_point(
    points: Sequence[SweepPoint],
    reference_exposure: float,
    fp_perplexity: float,
    max_ppl_ratio: float = 1.05,
    tolerance_bits: float = 0.0,
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
    lrs: Sequence[float] = (1e-5, 3e-5, 1e-4),
    steps: int = 30,
    eval_every: int = 10,
    seed: int = 0,
    **unlearn_kwargs: Any,
) -> list[SweepPoint]:
    """Unlearn a fresh copy (``load_model()``, one model in memory at a time) per learning rate,
    measuring every ``eval_every`` steps and at the end; the untouched model is measured once as
    the step-0 point (lr 0). ``measure(model) -> (forget exposure, retain perplexity)``."""
    model = load_model()
    exp0, ppl0 = measure(model)
    points = [SweepPoint(0.0, 0, exp0, ppl0)]
    del model
    for lr in lrs:
        model = load_model()

        def checkpoint(step: int, m: nn.Module, lr: float = lr) -> None:
            if step % eval_every == 0 or step == steps:
                e, p = measure(m)
                points.append(SweepPoint(lr, step, e, p))

        unlearn(model, tokenizer, forget_texts, retain_text, lr=lr, steps=steps, seed=seed, callback=checkpoint,
                **unlearn_kwargs)
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
    *,
    max_ppl_ratio: float = 1.05,
    tolerance_bits: float = 0.0,
    **sweep_options: Any,
) -> UnlearnSelection:
    """Sweep (:func:`unlearning_sweep`, which takes ``sweep_options``: ``lrs``, ``steps``,
    ``eval_every``, ``seed`` and :func:`unlearn`'s keywords), apply the stopping rule
    (:func:`choose_point`), and re-run the chosen (lr, steps) on a fresh copy; runs are
    deterministic, so the returned model is the measured checkpoint."""
    points = unlearning_sweep(load_model, tokenizer, forget_texts, retain_text, measure, **sweep_options)
    point, reason = choose_point(points, reference_exposure, fp_perplexity, max_ppl_ratio, tolerance_bits)
    model = load_model()
    log = None
    if point.steps > 0:
        # The sweep's own schedule options do not apply to one run; the seed and unlearn()'s options do.
        rerun = {k: v for k, v in sweep_options.items() if k not in ("lrs", "steps", "eval_every")}
        log = unlearn(model, tokenizer, forget_texts, retain_text, lr=point.lr, steps=point.steps, **rerun)
    return UnlearnSelection(model, point, reason, points, log)

