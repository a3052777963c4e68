"""Calibration: turn public text into token windows, find a model's decoder blocks, capture
their inputs, and accumulate each linear layer's proxy Hessian H = 2·XᵀX / n with forward hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .hf_model import decoder_blocks, pad_token_id
from .lm import cut_windows, encode_long, pad_sequences



def calibration_windows(tokenizer, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping token windows [n_windows, seq_len] covering the first ~n_tokens of `text`."""
    ids = encode_long(tokenizer, text)
    windows = cut_windows(ids, seq_len, max_windows=max(1, n_tokens // seq_len))
    if windows.shape[0] == 0:
        raise ValueError(
            f"calibration text has only {ids.numel()} tokens; at least seq_len={seq_len} are needed "
            "(pass a longer --calib file or a smaller --seq-len)"
        )
    return windows


class StopForward(Exception):
    """Raised by the input catcher once block 0's inputs are captured."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per batch, plus the keyword args blocks get and
    each batch's token mask (None: every position is real)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, None]]:
    """Token windows [n, seq_len] as batches of at most batch_size rows, every position real."""
    return [(w, None) for w in windows.split(batch_size)]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], first_block: nn.Module | None = None,
) -> BlockInputs:
    """Run the embedding part of the model and capture what block 0 (`first_block`, looked up
    when not given) receives for each batch.

    batches: (ids [B, T], token mask [B, T] or None when every position is real); padded
    positions (mask 0) are kept out of every Hessian collected on these inputs."""
    first_block = first_block if first_block is not None else decoder_blocks(model)[1][0]
    captured = BlockInputs()
    device = next(model.parameters()).device

    def catcher(module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = first_block.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for ids, mask in batches:
            captured.masks.append(mask)
            try:
                model(ids.to(device), attention_mask=None if mask is None else mask.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs, collector: "HessianCollector | None" = None) -> list[torch.Tensor]:
    """Forward every captured batch through one block; returns its output hidden states.
    A collector, if given, is told each batch's token mask so that padding stays out of H."""
    outs = []
    with torch.no_grad():
        for h, mask, args, kwargs in zip(inputs.hidden, inputs.masks, inputs.args, inputs.kwargs):
            if collector is not None:
                collector.next_batch(mask)
            out = block(h, *args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


class HessianCollector:
    """Accumulates H = 2·XᵀX / n (float32, [in, in]) of each named linear's input.

    Layers fed the very same input tensors (q/k/v, gate/up) share one accumulation and get the
    same H object back, so callers can reuse work done on it (e.g. GPTQ's Cholesky factor).
    """

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {name: 0 for name in linears}
        self.inputs_seen: dict[str, list[int]] = {name: [] for name in linears}
        # The last input tensor itself (kept alive, compared by identity) and its XᵀX. A key made of
        # data_ptr/shape/version is not enough: a freed activation's memory is reused by the next
        # one of the same shape, which would then be mistaken for it.
        self._last: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._n_inputs = 0
        self._shared: dict[tuple, torch.Tensor] = {}
        self._token_mask: torch.Tensor | None = None  # [B, T] of the batch being run; 0 = padding
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                _, input_id, XtX = self._last
            else:
                X = x.detach().reshape(-1, x.shape[-1]).float()
                if self._token_mask is not None:
                    X = X[self._token_mask.reshape(-1).to(X.device).bool()]
                XtX = X.t() @ X
                input_id, self._n_inputs = self._n_inputs, self._n_inputs + 1
                self._last = (x, input_id, XtX)
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(XtX)
            self.sums[name] += XtX
            self.counts[name] += x[..., 0].numel() if self._token_mask is None else int(self._token_mask.sum())
            self.inputs_seen[name].append(input_id)

        return hook

    def next_batch(self, token_mask: torch.Tensor | None) -> None:
        """Say which positions of the batch about to run are real: token_mask [B, T], 0 = padding
        (kept out of H); None = every position."""
        self._token_mask = token_mask

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2·XᵀX / n [in, in] (float32) of the named layer's inputs. Scaled in place: the layer's sum
        becomes its H (the same floats as 2.0 * sum / n), so call this once all batches have run."""
        key = tuple(self.inputs_seen[name])
        if key not in self._shared:
            self._shared[key] = self.sums.pop(name).mul_(2.0).div_(max(self.counts[name], 1))
        return self._shared[key]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None


def text_batches(tokenizer, texts: list[str], batch_size: int = 16, max_len: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded (ids, mask) batches of each text's tokens (BOS-free, truncated to max_len)."""
    pad = pad_token_id(tokenizer)
    seqs = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    return [pad_sequences(seqs[i : i + batch_size], pad)[:2] for i in range(0, len(seqs), batch_size)]


def n_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> int:
    """The tokens of a batch that count, as HessianCollector counts them: every position, or the unmasked ones."""
    return x[..., 0].numel() if mask is None else int(mask.sum())


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, in] as float32 rows [n, in] of its real tokens (padding, mask 0, left out)."""
    X = x.detach().reshape(-1, x.shape[-1]).float()
    return X if mask is None else X[mask.reshape(-1).to(X.device).bool()]


class LinearInputs:
    """The input of each named linear in the batch being run; linears fed the same tensor get one index."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.seen: list[torch.Tensor] = []
        self.which: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            index = next((i for i, seen in enumerate(self.seen) if seen is x), None)
            if index is None:
                index = len(self.seen)
                self.seen.append(x)
            self.which[name] = index

        return hook

    def clear(self) -> None:
        self.seen, self.which = [], {}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.clear()
