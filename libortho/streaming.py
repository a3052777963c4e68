"""A fine-tuned model whose decoder blocks stay on disk until the decomposition reaches them.

`open_streamed(folder)` builds the model on PyTorch's meta device, then reads from the checkpoint's
safetensors only what lives outside the decoder blocks (embeddings, final norm, lm_head) and rebuilds
the buffers that are computed rather than stored (rotary frequencies). `BlockLoader.load(b)` reads block
b's tensors when the decomposition starts on it; the block's linear weights are then replaced by the
INT base, so the host holds one block in float32 at a time, never the whole model.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .hf_model import decoder_blocks
from .shards import ShardedCheckpoint


class StreamingUnsupported(ValueError):
    """The model cannot be built block by block (a computed buffer this module cannot rebuild)."""


class BlockLoader:
    """Reads decoder block b's parameters and stored buffers from the checkpoint into the model."""

    def __init__(self, model: nn.Module, checkpoint: ShardedCheckpoint, dtype: torch.dtype, device: torch.device) -> None:
        self.checkpoint, self.dtype, self.device = checkpoint, dtype, device
        names = {id(m): name for name, m in model.named_modules()}
        _, self.blocks = decoder_blocks(model)
        self.prefixes = [names[id(block)] for block in self.blocks]
        self.model = model
        embeddings = [model.get_input_embeddings(), model.get_output_embeddings()]
        self.embeddings = {names[id(m)]: m for m in embeddings if m is not None and id(m) in names}

    def load(self, b: int) -> None:
        _materialize(self.blocks[b], self.prefixes[b], self.checkpoint, self.dtype, self.device)

    @contextmanager
    def embeddings_on_disk(self):
        """Inside: the input and output embeddings' weights are on the meta device again (vocab × hidden each:
        128 MiB of float32 together at 0.17B, 512 MiB at 1B), and on exit read back from the checkpoint as
        `open_streamed` read them. For the decoder blocks' stage, whose forwards start from block 0's captured
        inputs and end at the last block's output, so that neither embedding is read there."""
        stored = {id(p) for name, m in self.embeddings.items() for pname, p in m.named_parameters(recurse=False)
                  if f"{name}.{pname}" in self.checkpoint}
        for m in self.embeddings.values():
            for pname, param in list(m._parameters.items()):
                if param is not None and id(param) in stored:  # a tied lm_head shares the input embedding's weight
                    m._parameters[pname] = nn.Parameter(param.to("meta"), requires_grad=False)
        try:
            yield
        finally:
            for name, m in self.embeddings.items():
                _materialize(m, name, self.checkpoint, self.dtype, self.device, recurse=False)
            self.model.tie_weights()

    def hash_into(self, h) -> None:
        """The checkpoint's tensors (the model's identity for a resumable run)."""
        self.checkpoint.hash_into(h)


def open_streamed(folder: str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, BlockLoader]:
    """(model with its decoder blocks still on the meta device, the loader of those blocks)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    checkpoint = ShardedCheckpoint(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = torch.device(device)
    loader = BlockLoader(model, checkpoint, dtype, device)
    block_ids = {id(m) for block in loader.blocks for m in block.modules()}
    names = {id(m): name for name, m in model.named_modules()}
    for module in model.modules():
        if id(module) not in block_ids:
            _materialize(module, names[id(module)], checkpoint, dtype, device, recurse=False)
    model.tie_weights()
    # Every tensor the blocks will need must be stored under the model's own name (no key renames).
    left = [n for n, p in model.named_parameters() if p.is_meta and not (_in_blocks(n, loader.prefixes) and n in checkpoint)]
    if left:
        raise StreamingUnsupported(f"{folder} stores no tensor for {', '.join(left[:3])}: load the model whole")
    return model.eval(), loader


def _in_blocks(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _materialize(module: nn.Module, prefix: str, checkpoint: ShardedCheckpoint, dtype: torch.dtype, device: torch.device,
                 recurse: bool = True) -> None:
    """Replace `module`'s meta parameters and buffers by the checkpoint's tensors (or, for a buffer the
    checkpoint does not store, by one the module computes when built again from the model config)."""
    modules = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
    for name, m in modules:
        for pname, param in list(m._parameters.items()):
            key = f"{name}.{pname}" if name else pname
            if param is not None and param.is_meta and key in checkpoint:
                m._parameters[pname] = nn.Parameter(checkpoint.get(key).to(device=device, dtype=dtype), requires_grad=False)
        meta_buffers = [b for b, t in m._buffers.items() if t is not None and t.is_meta]
        stored = [b for b in meta_buffers if (f"{name}.{b}" if name else b) in checkpoint]
        for bname in stored:
            key = f"{name}.{bname}" if name else bname
            t = checkpoint.get(key)
            m._buffers[bname] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if len(stored) < len(meta_buffers):
            try:
                _rebuild_buffers(m, name, device)
            except StreamingUnsupported as err:
                raise StreamingUnsupported(f"{err}: load the model whole") from None


def rebuild_computed_buffers(model: nn.Module, device: torch.device) -> None:
    """Every buffer still on the meta device (one no checkpoint stores, such as rotary frequencies), rebuilt
    from the config its module was built from; StreamingUnsupported for a module that cannot be rebuilt."""
    for name, m in model.named_modules():
        if any(t is not None and t.is_meta for t in m._buffers.values()):
            _rebuild_buffers(m, name, device)


def _rebuild_buffers(m: nn.Module, name: str, device: torch.device) -> None:
    """Computed buffers (rotary inv_freq): build the module again from the config it was built from."""
    config = getattr(m, "config", None)
    try:
        with torch.device(device):
            fresh = type(m)(config=config)
    except Exception as err:
        raise StreamingUnsupported(f"cannot rebuild the computed buffers of {name or 'the model'} "
                                   f"({type(m).__name__}: {err})") from None
    for bname, t in list(m._buffers.items()):
        if t is not None and t.is_meta:
            m._buffers[bname] = fresh._buffers[bname]
