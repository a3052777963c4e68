"""A Hugging Face checkpoint folder's safetensors tensors, read one at a time and never as a whole model.

The forget objective reads the public model P only as weights: W_P of each decomposed layer, while that
layer is fitted. `ShardedCheckpoint` gives exactly that: each `get` opens the shard that holds the tensor
(memory-mapped by safetensors), copies the one tensor out and closes the shard, so that the host never
holds P, and its mapped pages are released as soon as the tensor is read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .artifact_format import ArtifactError

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


class ShardedCheckpoint:
    """Tensor name -> shard file of a checkpoint folder (`model.safetensors`, or shards listed in
    `model.safetensors.index.json`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ArtifactError(f"{index} is not a safetensors index ({err}); re-save the checkpoint") from None
            self.files = {name: self.folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            with self._open(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise ArtifactError(f"{self.folder} has no {SINGLE} or {INDEX}: the public model must be a folder of "
                                "safetensors weights (save it with save_pretrained)")

    def _open(self, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as err:  # safetensors raises its own error types for a broken header
            raise ArtifactError(f"cannot read {file} as safetensors: {err}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of `name`, from its shard's header (no data read)."""
        with self._open(self.files[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """A copy of tensor `name`, in its stored dtype."""
        with self._open(self.files[name]) as f:
            return f.get_tensor(name).clone()

    def hash_into(self, h: "hashlib._Hash") -> None:
        """Every tensor's name, dtype, shape and bytes, one at a time in name order."""
        for name in sorted(self.files):
            t = self.get(name)
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy())
