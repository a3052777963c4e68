"""The decomposition's plan stage: what it reads, checked and gathered before any weight changes (decompose.py).

`plan_decomposition` checks the inputs against the config, cuts the calibration text into windows and the forget
texts into padded batches, finds the decoder blocks and their target linears, and opens W_P of every target
(`PublicWeights`: checked against the fine-tune's shapes up front, each read as a float32 copy only while its layer
is fitted).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import calibrate
from .config import OrthoConfig
from .hf_model import decoder_blocks, linear_weight, target_linears
from .shards import ShardedCheckpoint
from .streaming import BlockLoader

LayerKey = tuple[int, str]  # (decoder block index, linear name inside the block)


@dataclass
class DecompositionPlan:
    """What the decomposition reads, gathered before any weight changes."""

    public_batches: list[tuple[torch.Tensor, torch.Tensor | None]]  # calibration windows [B, seq_len]
    private_batches: list[tuple[torch.Tensor, torch.Tensor]]  # forget texts, padded [B, T] + token mask
    blocks: nn.ModuleList  # the model's decoder blocks
    targets: list[dict[str, nn.Module]]  # per decoder block: the linears to decompose, by name
    public_weights: PublicWeights | dict[LayerKey, torch.Tensor]  # W_P [out, in] per target, read on demand (forget objective only)
    block_loader: BlockLoader | None = None  # a streamed model: reads block b's weights when quantize reaches it
    public_model: nn.Module | None = None  # P, whose own blocks run on the forget texts (forget_target="public_activations")


def plan_decomposition(
    model: nn.Module,
    tokenizer,
    calibration_text: str,
    config: OrthoConfig,
    public_model: nn.Module | ShardedCheckpoint | None = None,
    forget_texts: list[str] | None = None,
    block_loader: BlockLoader | None = None,
) -> DecompositionPlan:
    """Check the inputs against the config and gather everything the later stages read. `block_loader`:
    the model's decoder blocks are still on disk (streaming.open_streamed) and are read one at a time."""
    if config.forgets and public_model is None:
        raise ValueError(
            f"forget_source={config.forget_source!r} needs public_model: the public checkpoint the model was fine-tuned from"
        )
    if config.needs_forget_texts and not forget_texts:
        raise ValueError(f"forget_source={config.forget_source!r} needs forget_texts: the texts the base must not keep")
    if forget_texts and not config.needs_forget_texts:
        raise ValueError("forget_texts were given, but forget_source is not 'records' or 'lookalikes'")
    p_acts = config.forget_target == "public_activations"
    if p_acts and isinstance(public_model, ShardedCheckpoint):
        raise ValueError("forget_target='public_activations' runs P's own decoder blocks on the forget texts: it needs "
                         f"P loaded as a model (an nn.Module), not the checkpoint folder {public_model.folder} read tensor by tensor")
    windows = calibrate.calibration_windows(tokenizer, calibration_text, config.calib_tokens, config.seq_len)
    _, blocks = decoder_blocks(model)
    targets = [target_linears(block, config.include) for block in blocks]
    if not any(targets):
        raise ValueError(f"no linear layer inside the decoder blocks matches include={config.include!r}")
    private = calibrate.text_batches(tokenizer, list(forget_texts), max_len=config.seq_len) if forget_texts else []
    if forget_texts and not private:
        raise ValueError("every forget text is shorter than 2 tokens; nothing to fit the base against")
    public_weights = _public_weights(public_model, model, targets) if config.forgets else {}
    return DecompositionPlan(calibrate.window_batches(windows, config.batch_size), private, blocks, targets, public_weights,
                             block_loader, public_model if p_acts else None)


class PublicWeights:
    """W_P of every target, checked against the fine-tuned model's shapes up front and read one layer at a
    time as a float32 CPU copy (`get`), so that no float32 copy of the whole public model is ever held.
    `read(key)` gives W_P [out, in] in its stored dtype."""

    def __init__(self, read: Callable[[LayerKey], torch.Tensor]) -> None:
        self.read = read

    def get(self, key: LayerKey, device: torch.device | str = "cpu") -> torch.Tensor:
        """W_P [out, in] float32 on `device`: one copy, never P's own storage."""
        return self.read(key).to(device=device, dtype=torch.float32, copy=True)


def _public_weights(public: nn.Module | ShardedCheckpoint, model: nn.Module, targets: list[dict[str, nn.Module]]) -> PublicWeights:
    """W_P for every target, from P as a model or as a checkpoint folder read tensor by tensor."""
    if isinstance(public, ShardedCheckpoint):
        return _public_weights_from_shards(public, model, targets)
    _, public_blocks = decoder_blocks(public)
    if len(public_blocks) != len(targets):
        raise ValueError(
            f"public_model has {len(public_blocks)} decoder blocks and the fine-tuned model {len(targets)}: "
            "pass the checkpoint the model was fine-tuned from"
        )
    for b, block_targets in enumerate(targets):
        for name, module in block_targets.items():
            try:
                W_P = linear_weight(public_blocks[b].get_submodule(name))
            except AttributeError:
                raise ValueError(f"public_model has no layer {b}.{name}: pass the checkpoint the model was fine-tuned from") from None
            _check_public_shape(b, name, tuple(W_P.shape), module)
    return PublicWeights(lambda key: linear_weight(public_blocks[key[0]].get_submodule(key[1])))


def _public_weights_from_shards(ckpt: ShardedCheckpoint, model: nn.Module, targets: list[dict[str, nn.Module]]) -> PublicWeights:
    """P's tensors are named as the fine-tuned model's: the same architecture, saved the same way."""
    qualified = {id(m): name for name, m in model.named_modules()}
    tensor_names, transposed = {}, set()
    for b, block_targets in enumerate(targets):
        for name, module in block_targets.items():
            tensor = f"{qualified[id(module)]}.weight"
            if tensor not in ckpt:
                raise ValueError(f"the public model {ckpt.folder} has no tensor {tensor}: pass the checkpoint the "
                                 "model was fine-tuned from")
            shape = ckpt.shape(tensor)
            if not isinstance(module, nn.Linear):  # Conv1D keeps [in, out]
                shape = shape[::-1]
                transposed.add((b, name))
            _check_public_shape(b, name, shape, module)
            tensor_names[(b, name)] = tensor

    def read(key: LayerKey) -> torch.Tensor:
        W = ckpt.get(tensor_names[key])
        return W.t() if key in transposed else W

    return PublicWeights(read)


def _check_public_shape(b: int, name: str, shape: tuple, module: nn.Module) -> None:
    ft_shape = tuple(linear_weight(module).shape)
    if shape != ft_shape:
        raise ValueError(
            f"public_model's {b}.{name} is {shape}, the fine-tuned model's {ft_shape}: "
            "pass the checkpoint the model was fine-tuned from"
        )


def plan_shapes(plan: DecompositionPlan) -> dict[LayerKey, tuple[int, int]]:
    """[out, in] of every target, from the plan (before any weight is fitted)."""
    return {(b, name): tuple(linear_weight(m).shape) for b, targets in enumerate(plan.targets) for name, m in targets.items()}
