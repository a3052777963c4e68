"""Extraction: greedy decoding from each record's own prefix; extracted iff the secret comes out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..lm import pad_token_id
from ..records import CanaryRecord
from ._lm import _device, _encode, _lm_forward, _split_continuations

__all__ = ["ExtractionResult", "extract_secrets", "left_padded"]

@dataclass
class ExtractionResult:
    """Greedy continuation of a record's prefix; ``extracted`` iff it starts with the secret."""

    id: str
    extracted: bool
    continuation: str


def _secret_token_count(tokenizer: Any, record: CanaryRecord) -> int:
    _, (cont,) = _split_continuations(tokenizer, record.prefix, [record.secret])
    return len(cont)


def _prefix_batches(
    tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int, extra_tokens: int
) -> Iterator[tuple[Sequence[CanaryRecord], list[list[int]], list[int]]]:
    """``records`` in batches of ``batch_size``: (records, their prefixes' token ids, tokens to decode
    for each: its secret's tokens + ``extra_tokens``). Greedy and sampled extraction batch alike."""
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [_encode(tokenizer, r.prefix) for r in chunk]
        n_new = [_secret_token_count(tokenizer, r) + extra_tokens for r in chunk]
        yield chunk, prompts, n_new


def _is_extracted(continuation: str, secret: str) -> bool:
    # The secret usually follows a space that belongs to neither prefix nor secret.
    return continuation.lstrip().startswith(secret.strip())


def left_padded(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T], attention mask [B, T] and position ids [B, T] (0 at each first real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def _greedy_batch(model: torch.nn.Module, prompts: list[list[int]], n_new: int, pad_id: int) -> list[list[int]]:
    """Greedy decoding of ``n_new`` tokens for left-padded prompts; returns new ids per prompt."""
    ids, mask, positions = left_padded(prompts, pad_id, _device(model))
    logits, cache = _lm_forward(model, ids, None, mask, positions)
    generated = []
    for step in range(n_new):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        generated.append(nxt)
        if step == n_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = _lm_forward(model, nxt, cache, mask, positions)
    return torch.cat(generated, dim=1).cpu().tolist()


def extract_secrets(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[CanaryRecord],
    *,
    extra_tokens: int = 3,
    batch_size: int = 16,
) -> list[ExtractionResult]:
    """Greedy-decode len(secret tokens) + ``extra_tokens`` tokens from each record's prefix.

    Records are batched with left padding (attention mask + explicit position ids), so a
    batched result equals decoding each prompt alone up to float noise.
    """
    pad_id = pad_token_id(tokenizer)
    results: list[ExtractionResult] = []
    for chunk, prompts, n_new in _prefix_batches(tokenizer, records, batch_size, extra_tokens):
        new_ids = _greedy_batch(model, prompts, max(n_new), pad_id)
        for record, ids, n in zip(chunk, new_ids, n_new):
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            results.append(ExtractionResult(record.id, _is_extracted(text, record.secret), text))
    return results
