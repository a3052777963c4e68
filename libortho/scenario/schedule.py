"""The data order of a fine-tune: which member records and which public token windows each
optimizer step sees, both seeded by ``config.seed``."""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from ..lm import cut_windows, encode_long
from ..records import CanaryRecord
from .config import ScenarioConfig
from .corpus import public_corpus


def training_schedule(config: ScenarioConfig, members: Sequence[CanaryRecord]) -> list[list[str]]:
    """Record ids per training step (length ``config.steps``); member r appears exactly r.k times.

    Copies of a record go to distinct steps drawn uniformly at random (when k <= steps; else
    every step gets floor(k / steps) copies plus a random draw for the remainder).
    """
    rng = random.Random(f"libortho.scenario.schedule:{config.seed}")
    steps: list[list[str]] = [[] for _ in range(config.steps)]
    for record in members:
        full, rest = divmod(record.k, config.steps)
        chosen = list(range(config.steps)) * full + rng.sample(range(config.steps), rest)
        for s in chosen:
            steps[s].append(record.id)
    for s in steps:
        rng.shuffle(s)
    return steps


def public_windows(tokenizer: Any, config: ScenarioConfig, text: str | None = None) -> torch.Tensor:
    """Public token windows, long [steps, batch, seq_len], in the seeded training order.

    The ``train`` split of the config's corpus (or ``text``) is tokenized once, cut into
    consecutive non-overlapping windows, and the windows are shuffled; when the run needs more
    windows than there are, it starts another epoch with a new shuffle.
    """
    text = public_corpus("train", config.corpus) if text is None else text
    ids = encode_long(tokenizer, text)
    windows = cut_windows(ids, config.seq_len)
    n_windows = windows.shape[0]
    if n_windows == 0:
        raise ValueError(f"the public train text has {len(ids)} tokens, fewer than seq_len={config.seq_len}")
    rng = random.Random(f"libortho.scenario.windows:{config.seed}")
    need = config.steps * config.batch
    order: list[int] = []
    while len(order) < need:
        epoch = list(range(n_windows))
        rng.shuffle(epoch)
        order.extend(epoch)
    return windows[torch.tensor(order[:need])].view(config.steps, config.batch, config.seq_len)
