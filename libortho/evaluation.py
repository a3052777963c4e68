"""Quality evaluation: perplexity over fixed, non-overlapping token windows."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .lm import cut_windows, encode_long, next_token_nll


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, window] of the text's tokens (the ragged tail is dropped)."""
    ids = encode_long(tokenizer, text)
    windows = cut_windows(ids, window, max_windows)
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}; use more text")
    return windows


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats/token) over all windows [n, T]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        total += float(next_token_nll(model, batch))
        count += batch[:, 1:].numel()
    return total / count


PERPLEXITY_WINDOW = 256  # tokens per fixed window, the default everywhere perplexity is measured


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    window: int = PERPLEXITY_WINDOW,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """exp(mean token NLL) of `text` under `model`, over fixed non-overlapping windows of `window` tokens."""
    return math.exp(mean_nll(model, token_windows(tokenizer, text, window, max_windows), batch_size, progress))
