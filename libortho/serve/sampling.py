"""Next-token choice for a batch whose rows each have their own temperature, top_p and RNG.

Every row is sampled from its own logits with its own `torch.Generator`, so a row's tokens
depend only on its own logits and seed, never on which neighbours share the batch.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """temperature 0 = greedy (argmax); top_p in (0, 1]; seed None = fresh entropy."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed % (1 << 63))


def sample_row(logits: torch.Tensor, params: SamplingParams) -> int:
    """One token id from logits [vocab] (any float dtype, any device)."""
    logits = logits.float().cpu()
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
        keep[0] = True
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=params.generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=params.generator))


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """Token ids for logits [rows, vocab], one SamplingParams per row."""
    if all(p.temperature == 0.0 for p in params):  # all greedy: one argmax for the batch
        return torch.argmax(logits, dim=-1).tolist()
    return [sample_row(logits[i], p) for i, p in enumerate(params)]
