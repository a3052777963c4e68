"""Quality evaluation: perplexity over fixed, non-overlapping token windows."""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, window] of the text's tokens (the ragged tail is dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}; use more text")
    return ids[: n * window].reshape(n, window)


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats/token) over all windows [n, T]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
    return total / count


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str,
    window: int = 256,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """exp(mean token NLL) of `text` under `model`, over fixed non-overlapping windows of `window` tokens."""
    return math.exp(mean_nll(model, token_windows(tokenizer, text, window, max_windows), batch_size, progress))
