"""The work folder of a resumable decomposition: every finished decoder block's layers and the inputs
of the next block, so that a run stopped anywhere (Ctrl-C, an out-of-memory error, a lost machine)
continues after its last finished block and gives the same artifact as an uninterrupted run.

Layout, next to the output folder OUT (`.OUT.libortho-work/`, `work_folder_for`):

    progress.json             the fingerprint of the inputs and the config, the blocks done, the stats so far
    block_00000.safetensors   per finished block, per layer: the base (codes, scales, zeros), the bias, and
                              either the ortho stream (a layer-local config finishes layers in the block) or
                              the residual R and curvature H that the later sieve reads
    carry.safetensors         the hidden states entering the next block (public, private), the random state

A block counts as done once progress.json says so; every file is written to a temporary name and renamed,
progress.json last, so a run killed mid-write resumes from the previous block. The fingerprint is a SHA-256
of the config, the calibration and forget texts, and every tensor of the fine-tuned and public models:
resuming with any of them changed is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import OrthoConfig
from .csr import OrthoCSR
from .lowrank import LOWRANK_GROUP, LowRank, LowRankCodes
from .quantize import QuantizedWeight, QuantSpec

PROGRESS, CARRY = "progress.json", "carry.safetensors"


class WorkFolderError(ValueError):
    """A work folder that cannot be resumed: other inputs, another config, or not a work folder."""


def work_folder_for(out_dir: str | Path) -> Path:
    """The work folder of a decomposition into `out_dir`: beside it, hidden."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.libortho-work"


def fingerprint(config: OrthoConfig, calibration_text: str, forget_texts: list[str] | None, models: list) -> str:
    """SHA-256 of what determines the artifact: the config, the texts, every tensor of `models` (name, dtype,
    shape, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(config.fingerprint_dict(), sort_keys=True).encode())
    h.update(calibration_text.encode())
    h.update(json.dumps(list(forget_texts or [])).encode())
    for model in models:
        if model is None:
            h.update(b"none")
            continue
        if hasattr(model, "hash_into"):  # a checkpoint read tensor by tensor (shards.ShardedCheckpoint)
            model.hash_into(h)
            continue
        for name, t in model.state_dict().items():
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


@dataclass
class Progress:
    fingerprint: str
    n_blocks: int
    done: int
    stats: dict


class WorkFolder:
    """Saves and restores the per-block state of `decompose.quantize_model` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- progress ----------------------------------------------------------------------------
    def progress(self) -> Progress | None:
        file = self.path / PROGRESS
        if not file.is_file():
            return None
        try:
            return Progress(**json.loads(file.read_text()))
        except (ValueError, TypeError) as err:
            raise WorkFolderError(f"{file} is not a libortho work folder's progress file ({err}); remove {self.path}") from None

    def start(self, fingerprint_: str, n_blocks: int) -> int:
        """Open the folder for a run with these inputs; returns the number of blocks already done (0 for a new run)."""
        done = self.progress()
        if done is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=0o700, exist_ok=True)  # it holds what alpha 0 hides
            self._write_progress(Progress(fingerprint_, n_blocks, 0, {}))
            return 0
        if done.fingerprint != fingerprint_ or done.n_blocks != n_blocks:
            raise WorkFolderError(
                f"{self.path} holds an unfinished decomposition of other inputs or another config ({done.done} of "
                f"{done.n_blocks} blocks done): resume it with the same model, public model, texts and flags, or "
                f"remove {self.path} to start over"
            )
        return done.done

    def stats(self) -> dict:
        p = self.progress()
        return {} if p is None else p.stats

    def _write_progress(self, progress: Progress) -> None:
        tmp = self.path / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress.__dict__, indent=1))
        os.replace(tmp, self.path / PROGRESS)

    # ---- blocks ------------------------------------------------------------------------------
    def save_block(self, b: int, layers: dict, carry: dict[str, torch.Tensor], stats: dict) -> None:
        """Block b is done: its layers {name: LayerParts}, the tensors carried to block b+1, the stats so far."""
        tensors, meta = {}, {}
        for name, p in layers.items():
            meta[name] = _layer_tensors(name, p, tensors)
        _save(self._block_file(b), tensors, dict(layers=json.dumps(meta)))
        _save(self.path / CARRY, carry, {})
        progress = self.progress()
        self._write_progress(Progress(progress.fingerprint, progress.n_blocks, b + 1, stats))

    def load_block(self, b: int, config: OrthoConfig) -> dict:
        """{name: LayerParts} of finished block b."""
        with safe_open(str(self._block_file(b)), "pt") as f:
            meta = json.loads(f.metadata()["layers"])
            return {name: _layer_parts(f, name, kind, config) for name, kind in meta.items()}

    def load_layer(self, b: int, name: str, config: OrthoConfig):
        """LayerParts of one layer of finished block b, read alone from the block's file."""
        with safe_open(str(self._block_file(b)), "pt") as f:
            return _layer_parts(f, name, json.loads(f.metadata()["layers"])[name], config)

    def _block_file(self, b: int) -> Path:
        return self.path / f"block_{b:05d}.safetensors"

    def load_carry(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / CARRY))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class SpilledParts(MutableMapping):
    """{(block, name): LayerParts} in which a staged layer (one whose R, H and edit wait for the global sieve:
    float32 and as large as its weights) stays in memory only until its block is saved; from then on it is read
    back from the work folder, one layer at a time, each time it is asked for. Layers finished in their block
    (small: their ortho stream) stay in memory. Iteration keeps the order in which the layers were added."""

    def __init__(self, folder: WorkFolder, config: OrthoConfig) -> None:
        self.folder, self.config = folder, config
        self._held: dict = {}
        self._block_of: dict = {}  # key -> the block whose file holds it; None while held in memory

    def spill(self, b: int, names) -> None:
        """Block b is saved: its staged layers are dropped from memory."""
        for name in names:
            if self._held[(b, name)].ortho is None:
                del self._held[(b, name)]
                self._block_of[(b, name)] = b

    def __getitem__(self, key):
        if key in self._held:
            return self._held[key]
        b = self._block_of[key]  # KeyError for a key never added, as a dict gives
        return self.folder.load_layer(b, key[1], self.config)

    def __setitem__(self, key, value) -> None:
        self._held[key] = value
        self._block_of[key] = None

    def __delitem__(self, key) -> None:
        self._held.pop(key, None)
        del self._block_of[key]

    def __iter__(self):
        return iter(self._block_of)

    def __len__(self) -> int:
        return len(self._block_of)


def _layer_parts(f, name: str, kind: str, config: OrthoConfig):
    """One layer's LayerParts from an open block file `f` (safe_open); `kind` as `_layer_tensors` wrote it."""
    from .decompose import LayerParts
    from .ortho_split import OrthoParts

    keys = set(f.keys())

    def get(suffix: str) -> torch.Tensor | None:
        return f.get_tensor(f"{name}.{suffix}") if f"{name}.{suffix}" in keys else None

    base = QuantizedWeight(get("codes"), get("scales"), get("zeros"), config.quant_spec)
    if kind == "staged":
        edit = tuple(get(f"edit.{i}") for i in range(3)) if f"{name}.edit.0" in keys else None
        return LayerParts(base, get("R"), get("H"), get("bias"), edit)
    sparse = OrthoCSR(get("crow"), get("col"), get("val"), tuple(base.codes.shape))
    ortho = OrthoParts(sparse, LowRank(get("B"), get("A"), _codes(get, config))) if kind == "parts" else sparse
    return LayerParts(base, None, None, get("bias"), ortho=ortho)


def _codes(get, config: OrthoConfig) -> LowRankCodes | None:
    """The low-rank part's codes as `_layer_tensors` wrote them (config.lowrank_bits < 16), else None."""
    if get("Aq.codes") is None:
        return None
    spec = QuantSpec(config.lowrank_bits, LOWRANK_GROUP, True)
    return LowRankCodes(*(QuantizedWeight(get(f"{f}.codes"), get(f"{f}.scales"), get(f"{f}.zeros"), spec) for f in ("Aq", "Btq")))


def _layer_tensors(name: str, p, out: dict) -> str:
    """Put one layer's tensors into `out`; returns its kind: 'parts', 'csr' (finished) or 'staged'."""
    from .ortho_split import OrthoParts

    out[f"{name}.codes"], out[f"{name}.scales"], out[f"{name}.zeros"] = p.base.codes, p.base.scales, p.base.zeros
    if p.bias is not None:
        out[f"{name}.bias"] = p.bias
    if p.ortho is None:
        out[f"{name}.R"] = p.R
        if p.H is not None:
            out[f"{name}.H"] = p.H
        for i, e in enumerate(p.edit or ()):
            out[f"{name}.edit.{i}"] = e
        return "staged"
    sparse = p.ortho.sparse if isinstance(p.ortho, OrthoParts) else p.ortho
    out[f"{name}.crow"], out[f"{name}.col"], out[f"{name}.val"] = sparse.crow, sparse.col, sparse.val
    if isinstance(p.ortho, OrthoParts):
        low = p.ortho.lowrank
        out[f"{name}.B"], out[f"{name}.A"] = low.B, low.A
        for f, q in (() if low.codes is None else (("Aq", low.codes.A), ("Btq", low.codes.Bt))):
            out[f"{name}.{f}.codes"], out[f"{name}.{f}.scales"], out[f"{name}.{f}.zeros"] = q.codes, q.scales, q.zeros
        return "parts"
    return "csr"


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(_unshared(tensors), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (q/k/v share H): the second and later get a copy."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()  # the carried activations live on the fits' device
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out
