"""Calibration: turn public text into token windows, find a model's decoder blocks, capture
their inputs, and accumulate each linear layer's proxy Hessian H = 2·XᵀX / n with forward hooks.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

try:  # GPT-2 style models store linear weights transposed in Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

BLOCK_CONTAINERS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def calibration_windows(tokenizer, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """Non-overlapping token windows [n_windows, seq_len] covering the first ~n_tokens of `text`."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = min(max(1, n_tokens // seq_len), ids.numel() // seq_len)
    if n_windows == 0:
        raise ValueError(
            f"calibration text has only {ids.numel()} tokens; at least seq_len={seq_len} are needed "
            "(pass a longer --calib file or a smaller --seq-len)"
        )
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len)


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks, and its qualified name."""
    for name in BLOCK_CONTAINERS:
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return name, module
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for {', '.join(BLOCK_CONTAINERS)}"
    )


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever the module stores."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.weight.detach().t()  # Conv1D stores [in, out]


def target_linears(block: nn.Module, include: str | None = None) -> dict[str, nn.Module]:
    """Linear layers of one block to decompose, by name within the block (optionally a regex filter)."""
    pattern = re.compile(include) if include else None
    return {
        name: m
        for name, m in block.named_modules()
        if is_linear(m) and (pattern is None or pattern.search(name))
    }


def replace_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put `new` where the submodule named `dotted` (relative to root) is."""
    parent_name, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class StopForward(Exception):
    """Raised by the input catcher once block 0's inputs are captured."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per batch, plus the keyword args blocks get."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> BlockInputs:
    """Run the embedding part of the model and capture what block 0 receives for each batch."""
    _, blocks = decoder_blocks(model)
    captured = BlockInputs()
    device = next(model.parameters()).device

    def catcher(module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.args.append(tuple(args[1:]))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(windows[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """Forward every captured batch through one block; returns its output hidden states."""
    outs = []
    with torch.no_grad():
        for h, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
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
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last is not None and self._last[0] is x:
                _, input_id, XtX = self._last
            else:
                X = x.detach().reshape(-1, x.shape[-1]).float()
                XtX = X.t() @ X
                input_id, self._n_inputs = self._n_inputs, self._n_inputs + 1
                self._last = (x, input_id, XtX)
            if name not in self.sums:
                self.sums[name] = torch.zeros_like(XtX)
            self.sums[name] += XtX
            self.counts[name] += x[..., 0].numel()
            self.inputs_seen[name].append(input_id)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2·XᵀX / n [in, in] (float32) of the named layer's inputs."""
        key = tuple(self.inputs_seen[name])
        if key not in self._shared:
            self._shared[key] = 2.0 * self.sums[name] / max(self.counts[name], 1)
        return self._shared[key]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None


# ---- forget-aware statistics: what each weight's fine-tuning update did to which text --------
def _nll(model: nn.Module, batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over the positions where mask [B, T] is 1 (nats)."""
    logits = model(batch, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum()


def _padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def update_attribution(
    model: nn.Module,
    public_weights: dict[str, torch.Tensor],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    n_points: int = 2,
) -> dict[str, torch.Tensor]:
    """Per-weight share of a loss change caused by fine-tuning (integrated gradients).

    model: the fine-tuned model (its decoder linears hold W_ft); public_weights: W_P [out, in]
    for each qualified linear name. For Δ = W_ft - W_P and the path W(t) = W_P + tΔ,
    A_ij = -Δ_ij · mean_t ∂L/∂W_ij(t) (midpoint rule over n_points), so Σ A ≈ L(W_P) - L(W_ft):
    A_ij > 0 means that weight's update lowered the loss of the given batches (summed NLL, nats).
    The model's weights are restored afterwards.
    """
    modules = dict(model.named_modules())
    finetuned = {name: linear_weight(modules[name]).clone() for name in public_weights}
    grads = {name: torch.zeros_like(w) for name, w in finetuned.items()}
    with weights_at(model, finetuned), _grads_only_for(model, [modules[name] for name in finetuned]):
        for point in range(n_points):
            t = (point + 0.5) / n_points
            for name, W_ft in finetuned.items():
                set_linear_weight(modules[name], public_weights[name] + t * (W_ft - public_weights[name]))
            for ids, mask in batches:
                _nll(model, ids, mask).backward()
            for name in finetuned:
                grads[name] += _take_grad(modules[name]) / n_points
    return {name: -(finetuned[name] - public_weights[name]) * grads[name] for name in finetuned}


@contextlib.contextmanager
def _grads_only_for(model: nn.Module, linears: list[nn.Module]) -> Iterator[None]:
    """Only the given linears' weights require grad inside; every flag is restored on exit."""
    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in linears:
            m.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)


def _take_grad(module: nn.Module) -> torch.Tensor:
    """The weight's accumulated gradient as [out, in], cleared for the next backward."""
    g = module.weight.grad
    module.weight.grad = None
    return g if isinstance(module, nn.Linear) else g.t()


@contextlib.contextmanager
def weights_at(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily set the named linears' weights to W [out, in]; restored on exit."""
    modules = dict(model.named_modules())
    saved = {name: linear_weight(modules[name]).clone() for name in weights}
    try:
        for name, W in weights.items():
            set_linear_weight(modules[name], W)
        yield
    finally:
        for name, W in saved.items():
            set_linear_weight(modules[name], W)


def empirical_fisher(
    model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher [out, in] of each named linear: mean over the sequences of all
    `batches` of (∂L_seq/∂W)², L_seq = the sequence's summed NLL (nats), at the model's weights."""
    modules = dict(model.named_modules())
    fisher = {name: torch.zeros_like(linear_weight(modules[name])) for name in names}
    n = 0
    with _grads_only_for(model, [modules[name] for name in names]):
        for ids, mask in batches:
            for row in range(ids.shape[0]):  # per-sequence gradients: square before averaging
                _nll(model, ids[row : row + 1], mask[row : row + 1]).backward()
                n += 1
                for name in names:
                    fisher[name] += _take_grad(modules[name]).square()
    return {name: F / max(n, 1) for name, F in fisher.items()}


def set_linear_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write W [out, in] into a Linear / Conv1D weight in place."""
    with torch.no_grad():
        module.weight.copy_(W if isinstance(module, nn.Linear) else W.t())


def text_batches(tokenizer, texts: list[str], batch_size: int = 16, max_len: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Padded (ids, mask) batches of each text's tokens (BOS-free, truncated to max_len)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    return [_padded(seqs[i : i + batch_size], pad) for i in range(0, len(seqs), batch_size)]
