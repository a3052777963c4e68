"""Next-token choice for a batch whose rows each have their own temperature, top_p and RNG.

All rows are sampled together on the logits' device (a GPU batch stays on the GPU; the only
host sync is the one `.tolist()` of the chosen ids). Each sampled row draws one uniform number
from its own `torch.Generator` (on the host) and picks its token by inverse CDF, so a row's tokens
depend only on its own logits and seed, never on which neighbours share the batch.

Sampling cannot fail the batch: logits are sanitised (NaN is never chosen, +inf wins),
temperatures too small to divide by are greedy, and a row without a finite logit comes back as
a RowFailed for that row alone while its neighbours go on.
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


NO_FINITE_LOGIT = "the model gave no finite logit for this row"


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int | RowFailed]:
    """One token id per row of logits [rows, vocab] (any float dtype, any device; one
    SamplingParams per row), or a RowFailed for a row that has no finite logit."""
    if not params:
        return []
    device = logits.device
    # NaN is never chosen; +inf becomes the largest float, so a row with +inf picks among its +inf tokens
    clean = torch.nan_to_num(logits.detach().float(), nan=-torch.inf, posinf=torch.finfo(torch.float32).max,
                             neginf=-torch.inf)
    top, ids = clean.max(dim=-1)  # greedy choice of every row
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        index = torch.tensor(drawn, dtype=torch.int64).to(device, non_blocking=True)
        # temperature, top_p and one uniform number per drawn row, from the row's own generator
        knobs = torch.tensor([[params[i].temperature for i in drawn], [params[i].top_p for i in drawn],
                              [float(torch.rand((), generator=params[i].generator, dtype=torch.float64))
                               for i in drawn]], dtype=torch.float64).to(device, non_blocking=True)
        ids = ids.index_copy(0, index, _draw(clean.index_select(0, index), top.index_select(0, index), knobs))
    chosen = torch.where(torch.isfinite(top), ids, torch.full_like(ids, -1)).tolist()
    return [token if token >= 0 else RowFailed(f"sampling failed: {NO_FINITE_LOGIT}") for token in chosen]


def _draw(logits: torch.Tensor, top: torch.Tensor, knobs: torch.Tensor) -> torch.Tensor:
    """Token ids [m] drawn from sanitised logits [m, V] with row maxima top [m]; knobs [3, m]
    float64: temperature (>= GREEDY_BELOW), top_p in (0, 1], uniform number in [0, 1)."""
    temperature, top_p, uniform = knobs
    # shifted so that the largest is exactly 0: every weight lies in [0, 1], the top one is 1
    weights = torch.exp((logits - top.unsqueeze(1)) / temperature.unsqueeze(1).float())
    weights, order = torch.sort(weights, dim=-1, descending=True)
    mass = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    # top-p: keep the smallest prefix whose mass reaches top_p (always at least the top token)
    keep = (mass - weights) / mass[:, -1:] < top_p.unsqueeze(1)
    keep[:, 0] = True
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    mass = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    # inverse CDF: the first token whose cumulative mass passes uniform * total; never past the
    # last token of positive weight (the kept, positive weights are a prefix of the sorted ones)
    at = torch.searchsorted(mass, (uniform * mass[:, -1]).unsqueeze(1), right=True).squeeze(1)
    at = torch.minimum(at, (weights > 0).sum(dim=-1) - 1).clamp(min=0)
    return order.gather(1, at.unsqueeze(1)).squeeze(1)
