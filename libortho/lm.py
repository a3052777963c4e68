"""Language-model primitives shared by fine-tuning, unlearning, calibration and evaluation.

One copy each of: the token ids of a long text, non-overlapping token windows, right-padding of
variable-length token sequences into a batch, and the next-token negative log-likelihood.
Units: NLL in nats (natural log), summed over target tokens unless a caller divides it.
Shapes: B = batch rows, T = tokens per row, N = tokens of a text, V = vocabulary size.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

IGNORE_INDEX = -100  # label of a position that is not a target (padding); torch's default ignore_index

__all__ = [
    "IGNORE_INDEX",
    "encode_long",
    "cut_windows",
    "pad_sequences",
    "next_token_nll",
    "target_count",
    "sequences_nll",
]


def encode_long(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids long [N] of a text of any length, without special tokens.

    The tokenizer's ``model_max_length`` is lifted for the call: the text is cut into windows
    afterwards, so its "sequence too long" warning would be noise.
    """
    saved = getattr(tokenizer, "model_max_length", None)
    try:
        if saved is not None:
            tokenizer.model_max_length = int(1e12)
        return torch.tensor(list(tokenizer(text, add_special_tokens=False)["input_ids"]), dtype=torch.long)
    finally:
        if saved is not None:
            tokenizer.model_max_length = saved


def cut_windows(ids: torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, length] of token ids [N]; the ragged tail is dropped.

    n = N // length, at most ``max_windows``; n may be 0 (callers say what that means for them).
    """
    n = ids.numel() // length
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * length].reshape(n, length)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token sequences into (ids, mask, labels), each long [B, T], T = the longest length.

    ``mask`` is 1 on real tokens and 0 on padding; ``labels`` are the ids with padding set to
    :data:`IGNORE_INDEX`, so padding is never a target of :func:`next_token_nll`.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
        labels[row, : len(s)] = torch.tensor(s)
    return ids, mask, labels


def next_token_nll(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    per_sequence: bool = False,
) -> torch.Tensor:
    """Next-token NLL in nats, summed over the targets: a scalar, or [B] with ``per_sequence``.

    ``ids`` long [B, T] are fed to the model (``attention_mask=mask`` [B, T] or None when every
    position is real); position t's logits are scored against ``labels[:, t + 1]`` ([B, T];
    None = ``ids``), and labels equal to :data:`IGNORE_INDEX` are skipped. The logits are
    upcast to float32 before the softmax, so half-precision models sum in float32.
    """
    labels = ids if labels is None else labels
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
    if per_sequence:
        nll = nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
        return nll.view(ids.shape[0], -1).sum(dim=1)
    return nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def target_count(labels: torch.Tensor) -> int:
    """Number of next-token targets in labels [B, T] (positions 1.. that are not IGNORE_INDEX)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def sequences_nll(
    model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str,
    per_sequence: bool = False,
) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL in nats -- a scalar, or [B] with ``per_sequence`` --, target tokens)
    of variable-length token sequences, each its own row from position 0, right-padded."""
    ids, mask, labels = pad_sequences(seqs, pad_id)
    nll = next_token_nll(model, ids.to(device), labels.to(device), mask.to(device), per_sequence=per_sequence)
    return nll, target_count(labels)
