"""The fine-tune of a scenario: AdamW on the weights of the linear layers inside the decoder
blocks only (embeddings, norms, lm_head and biases stay frozen: anything changed outside the
decomposed weights would be a leak path at alpha = 0).

Data layout of one training step (the same in the fine-tune and the retrain reference):
  * ``batch`` public windows of ``seq_len`` tokens, cut from the tokenized ``train`` split,
    in a seeded order -- identical, token for token, in the fine-tune and the reference;
  * (fine-tune only) the member records scheduled for this step, each one its own short
    sequence ``tokenizer(record.text) + [EOS]``, right-padded into a second small batch.
  Loss = (sum of public token NLL + sum of record token NLL) / (number of public target
  tokens of a step): a fixed normaliser, so the reference's gradient is exactly the
  fine-tune's minus the records' term. Each record is its own sequence (not packed into
  public windows) because the attacks (extraction, exposure, membership inference in
  :mod:`libortho.privacy`) query it the same way, from its own prefix at position 0 with
  the same ``tokenizer(text)`` call; it keeps the count k exact; and it makes the public
  batches of the two runs bit-identical.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..hf_model import pad_token_id
from ..lm import next_token_nll, sequences_nll
from ..records import CanaryRecord
from .canaries import record_ids
from .config import ScenarioConfig
from .schedule import public_windows, training_schedule


def trainable_weights(model: nn.Module, blocks: int | Sequence[int] | None = None) -> dict[str, nn.Parameter]:
    """Weights of the linear layers inside the chosen decoder blocks, by qualified name.

    ``blocks``: None = all, an int n = the last n blocks, a sequence = block indices.

    Biases are not included: the decomposition keeps them exact in the base stream, so a trained
    bias would carry private information past alpha = 0.
    """
    from ..hf_model import decoder_blocks, is_linear

    container, layers = decoder_blocks(model)
    n = len(layers)
    if blocks is None:
        chosen = list(range(n))
    elif isinstance(blocks, int):
        chosen = list(range(max(0, n - blocks), n))
    else:
        chosen = []
        for b in blocks:
            if not -n <= b < n:
                raise ValueError(f"train block {b} out of range for a model with {n} decoder blocks")
            chosen.append(b % n)
        chosen = sorted(set(chosen))
    out: dict[str, nn.Parameter] = {}
    for i in chosen:
        for name, module in layers[i].named_modules():
            if is_linear(module):
                out[f"{container}.{i}.{name}.weight"] = module.weight
    return out



def frozen_trainable_weights(model: nn.Module, blocks: int | Sequence[int] | None = None) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` and return the :func:`trainable_weights` (still frozen:
    the caller turns their gradients on when its training starts)."""
    weights = trainable_weights(model, blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(weights.values())
    if not params:
        raise ValueError("no trainable weights: the chosen decoder blocks have no linear layers")
    return params


def _lr_lambda(config: ScenarioConfig) -> Callable[[int], float]:
    """The learning-rate schedule as a multiplier of ``config.lr``: linear warm-up, then cosine
    decay to ``config.min_lr_ratio`` at the last step."""
    def f(step: int) -> float:  # multiplier of lr for optimizer step `step` (0-based)
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps - 1)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def finetune(
    model: nn.Module,
    tokenizer: Any,
    config: ScenarioConfig,
    members: Sequence[CanaryRecord] = (),
    windows: torch.Tensor | None = None,
    schedule: list[list[str]] | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
) -> dict[str, Any]:
    """Fine-tune ``model`` in place; returns a log (per-step losses, tokens, seconds).

    ``members`` empty = the retrain reference. Only :func:`trainable_weights` change; dropout is
    off (the model stays in eval mode), so a run is a deterministic function of the config.
    """
    from tqdm.auto import tqdm

    windows = public_windows(tokenizer, config) if windows is None else windows
    if schedule is None:
        schedule = training_schedule(config, members) if members else [[] for _ in range(config.steps)]
    if len(schedule) != config.steps or windows.shape[0] != config.steps:
        raise ValueError("schedule and windows must have config.steps entries")
    by_id = {r.id: r for r in members}
    seqs = {r.id: record_ids(tokenizer, r) for r in members}
    pad_id = pad_token_id(tokenizer)

    params = frozen_trainable_weights(model, config.train_blocks)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    device = params[0].device
    norm = float(config.batch * (config.seq_len - 1))  # public target tokens per step

    log: dict[str, Any] = {"public_loss": [], "record_loss": [], "record_tokens": 0, "public_tokens": 0}
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config))
        bar = tqdm(range(config.steps), desc=desc, disable=not progress, unit="step", dynamic_ncols=True)
        try:
            for step in bar:
                batch = windows[step].to(device)
                pub = next_token_nll(model, batch)
                loss = pub / norm
                rec_mean = float("nan")
                if schedule[step]:
                    for rid in schedule[step]:
                        if rid not in by_id:
                            raise ValueError(f"schedule names unknown record {rid!r}")
                    rec, n_rec = sequences_nll(model, [seqs[rid] for rid in schedule[step]], pad_id, device)
                    loss = loss + rec / norm
                    log["record_tokens"] += n_rec
                    rec_mean = rec.item() / n_rec
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                pub_mean = pub.item() / norm
                log["public_loss"].append(round(pub_mean, 5))
                log["record_loss"].append(None if math.isnan(rec_mean) else round(rec_mean, 5))
                log["public_tokens"] += int(batch.numel())
                bar.set_postfix(loss=f"{pub_mean:.3f}", rec=f"{rec_mean:.3f}" if not math.isnan(rec_mean) else "-")
        finally:
            bar.close()
            for p in params:
                p.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
    log["seconds"] = round(time.perf_counter() - t0, 2)
    log["cpu_seconds"] = round(time.process_time() - c0, 2)  # all threads; robust to other jobs' load
    log["trained_weights"] = len(params)
    log["trained_parameters"] = int(sum(p.numel() for p in params))
    return log

