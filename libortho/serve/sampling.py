"""Next-token choice for a batch whose rows each have their own temperature, top_p and RNG.

Every row is sampled from its own logits with its own `torch.Generator`, so a row's tokens
depend only on its own logits and seed, never on which neighbours share the batch.

Sampling cannot fail the batch: logits are sanitised row by row (NaN is never chosen, +inf wins),
temperatures too small to divide by are greedy, and a row that still cannot be sampled comes back
as a RowFailed for that row alone while its neighbours go on.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

# Below this, logits / temperature overflows (1e-300 and 5e-324 make it inf, and softmax NaN), and
# long before that the distribution is one-hot anyway: such a row is greedy.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """temperature below GREEDY_BELOW (0 included) = greedy (argmax); top_p in (0, 1]; seed None = fresh entropy."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu")
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed % (1 << 63))  # any int, negative or past 64 bits, maps into torch's range

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class RowFailed:
    """A row that could not be sampled, and why (one line)."""

    reason: str


def sanitised(logits: torch.Tensor) -> torch.Tensor:
    """Logits [rows, vocab] as float64 on the CPU where NaN is -inf (never chosen) and +inf is the
    largest finite float32 (so a row with +inf picks among its +inf tokens)."""
    clean = logits.detach().to("cpu", torch.float64)
    return torch.nan_to_num(clean, nan=-torch.inf, posinf=torch.finfo(torch.float32).max, neginf=-torch.inf)


def sample_row(logits: torch.Tensor, params: SamplingParams) -> int:
    """One token id from sanitised logits [vocab] (see `sanitised`); ValueError if the row has no finite logit."""
    top = logits.max()
    if not torch.isfinite(top):
        raise ValueError(NO_FINITE_LOGIT)
    if params.greedy:
        return int(torch.argmax(logits))
    # shifted so that the largest is exactly 0: every weight lies in [0, 1], the top one is 1, the sum is >= 1
    weights = torch.exp((logits - top) / params.temperature)
    if params.top_p < 1.0:
        sorted_weights, order = torch.sort(weights, descending=True)
        mass = torch.cumsum(sorted_weights, dim=-1) / sorted_weights.sum()
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        keep = (mass - sorted_weights / sorted_weights.sum()) < params.top_p
        keep[0] = True
        sorted_weights = torch.where(keep, sorted_weights, torch.zeros_like(sorted_weights))
        return int(order[torch.multinomial(sorted_weights, 1, generator=params.generator)])
    return int(torch.multinomial(weights, 1, generator=params.generator))


NO_FINITE_LOGIT = "the model gave no finite logit for this row"


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int | RowFailed]:
    """One token id per row of logits [rows, vocab] (one SamplingParams per row), or a RowFailed
    for a row that could not be sampled."""
    if all(p.greedy for p in params):
        return _greedy_batch(logits)
    clean = sanitised(logits)
    return [_sample_or_fail(clean[i], p) for i, p in enumerate(params)]


def _greedy_batch(logits: torch.Tensor) -> list[int | RowFailed]:
    """Argmax of every row where the logits are (a GPU batch stays on the GPU; only the ids move)."""
    clean = torch.nan_to_num(logits.detach().float(), nan=-torch.inf, posinf=torch.finfo(torch.float32).max,
                             neginf=-torch.inf)
    ids = torch.argmax(clean, dim=-1).tolist()
    finite = torch.isfinite(clean).any(dim=-1).tolist()
    return [token if ok else RowFailed(f"sampling failed: {NO_FINITE_LOGIT}") for token, ok in zip(ids, finite)]


def _sample_or_fail(logits: torch.Tensor, params: SamplingParams) -> int | RowFailed:
    try:
        return sample_row(logits, params)
    except Exception as err:  # one row's trouble must stay that row's
        return RowFailed(f"sampling failed: {err}" if isinstance(err, ValueError) else
                         f"sampling failed: {type(err).__name__}: {err}")
