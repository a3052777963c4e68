"""Model surgery and Hugging Face quirks, in one place: where a causal LM keeps its decoder
blocks, which of their modules are linear layers and how their weights are laid out, how to put
a module in another's place, on which device a module lives, and which token id pads a batch.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

try:  # GPT-2 style models store linear weights transposed in Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

# Where the families libortho has met keep their ModuleList of transformer blocks.
BLOCK_CONTAINERS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's transformer blocks."""
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
    """The weight as [out, in], whatever the module stores (Conv1D keeps [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.weight.detach().t()


def target_linears(block: nn.Module, include: str | None = None) -> dict[str, nn.Module]:
    """Linear layers of one block, by name within the block (optionally filtered by a regex)."""
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


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for an empty module)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its (first) end-of-sequence
    token, else 0. Padded positions are masked out, so the choice only has to be a valid id."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = min(eos, default=None)
    return int(eos) if eos is not None else 0
