"""A batch of sequences sharing one left-padded KV cache, with one alpha per row.

Shapes: B rows, T cache columns. `mask` [B, T] is 1 where a column holds one of the row's real
tokens; padding is always on the left, so a row's real tokens are its last mask.sum() columns.
`positions` [B] is each row's next position id (its number of real tokens), passed explicitly so
that RoPE never sees the padding.

Rows can join at a step boundary (`merge`: the shorter cache is left-padded with zero K/V that the
mask hides) and leave (`keep`), which is what continuous batching needs. That surgery is only
done on plain full-attention caches (`DynamicLayer`); for other cache types `joinable` is False
and the engine admits new rows only when the batch is empty.

Every forward runs inside `libortho.alpha(model, alphas)` with a [B] tensor: row i is computed
with alpha_i alone (OrthoLinear scales the ortho product row by row).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..switch import alpha as alpha_scope
from .engine_stats import EngineStats


def _cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version takes the KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def cache_layers(cache) -> list:
    """The per-layer K/V holders of a DynamicCache (each with .keys / .values [B, H, T, D])."""
    return list(getattr(cache, "layers", []))


def cache_is_joinable(cache) -> bool:
    """True if rows of this cache can be padded, concatenated and dropped (plain full attention)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return False
    layers = cache_layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class KVBatch:
    """Rows of one batch: their cache, mask and positions. Not thread-safe: one worker owns it."""

    def __init__(self, model: nn.Module, cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.model, self.cache, self.mask, self.positions = model, cache, mask, positions

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def joinable(self) -> bool:
        return cache_is_joinable(self.cache)

    # ---- forwards ---------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """Logits of each row's last position, [B, vocab] float32."""
        kwargs = {_cache_kwarg(self.model): self.cache}
        # the scope is set here, in the worker thread, for this forward only: nothing relies on a default
        alphas = alphas.to(device=ids.device, dtype=torch.float32)  # once here, not once per layer
        with torch.inference_mode(), alpha_scope(self.model, alphas):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :].float()

    @classmethod
    def prefill(cls, model: nn.Module, prompts: list[list[int]], alphas: torch.Tensor,
                pad_id: int) -> tuple["KVBatch", torch.Tensor]:
        """Run the prompts [b lists of ids] left-padded as one batch; (batch, logits [b, vocab])."""
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        batch = cls(model, new_cache(model), mask, mask.sum(-1))
        logits = batch._forward(ids, mask, pos, alphas)
        return batch, logits

    def step(self, tokens: list[int], alphas: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (tokens [B]); logits [B, vocab] of the next position."""
        device = self.mask.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones((self.size, 1), dtype=self.mask.dtype, device=device)], dim=1)
        logits = self._forward(ids, self.mask, self.positions.unsqueeze(1), alphas)
        self.positions = self.positions + 1
        return logits

    # ---- membership -------------------------------------------------------------------------
    def merge(self, other: "KVBatch") -> None:
        """Append other's rows after ours (in place). Both must be joinable."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(other.cache), strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(other.mask, width)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order; drop cache columns that are padding in every row left."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        if not self.joinable:  # other cache types: the cache's own row selection, no column surgery
            self.cache.batch_select_indices(index)
            self.mask, self.positions = mask, self.positions.index_select(0, index)
            return
        first = int(mask.any(0).to(torch.int8).argmax())  # leading columns no remaining row uses
        for layer in cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)


def _left_pad(kv: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, width, D] with zeros in front (masked out, never attended)."""
    return F.pad(kv, (0, 0, width - kv.shape[-2], 0)) if kv.shape[-2] < width else kv


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask


class BatchRunner:
    """The engine's model side on a KVBatch, for models the slot cache cannot run: a new row's
    whole prompt is prefilled at once (left-padded with the other new rows) and merged into the
    running batch. Same interface as slot_runner.SlotRunner; rows keep `prefilled` up to date."""

    def __init__(self, model: nn.Module, pad_id: int, stats: EngineStats | None = None) -> None:
        self.model, self.pad_id = model, pad_id
        self.stats = stats if stats is not None else EngineStats()
        self.batch: KVBatch | None = None
        self.rows: list = []  # the engine's rows, in the batch's row order

    @property
    def joinable(self) -> bool:
        return self.batch is None or self.batch.joinable

    def admit(self, row) -> None:
        row.prefilled = 0

    def prefill(self, rows: list) -> tuple[list, torch.Tensor]:
        """Prefill every given row's whole prompt as one batch; (rows, logits [len(rows), V])."""
        alphas = torch.tensor([r.job.alpha for r in rows], dtype=torch.float32)
        self.stats.step("prefill", "eager")
        self.stats.prefilled(sum(len(r.job.prompt_ids) for r in rows),
                             len(rows) * max(len(r.job.prompt_ids) for r in rows))
        batch, logits = KVBatch.prefill(self.model, [r.job.prompt_ids for r in rows], alphas, self.pad_id)
        if self.batch is None:
            self.batch, self.rows = batch, list(rows)
        else:
            self.batch.merge(batch)
            self.rows.extend(rows)
        for r in rows:
            r.prefilled = len(r.job.prompt_ids)
        return rows, logits

    def decode(self, rows: list) -> tuple[list, torch.Tensor]:
        """One step of every row in the batch (`rows`: the same rows, in any order); (rows in the
        batch's order, logits [len, V])."""
        alphas = torch.tensor([r.job.alpha for r in self.rows], dtype=torch.float32)
        self.stats.step("decode", "eager")
        return self.rows, self.batch.step([r.next_token for r in self.rows], alphas)

    def release(self, rows: list) -> None:
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if keep:
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]
        else:
            self.batch, self.rows = None, []
