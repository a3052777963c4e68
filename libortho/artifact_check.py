"""Checks on a libortho artifact's files before any of it is used: every file's SHA-256 against
the manifest, the tensors' shapes and dtypes, and the ortho stream's CSR structure (the
manifest's own schema lives with the format, in artifact_format.py).

Threat model: the hashes catch corruption, truncation and mix-ups (a file from another
artifact, another decomposition of the same base). They do not stop an attacker who can
rewrite libortho.json as well: whoever can write the folder decides what it contains.
Every failure is an `ArtifactError` naming the file and the field or tensor.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .artifact_format import CSR_KEYS, LOWRANK_KEYS, MANIFEST, ArtifactError
from .lowrank import LOWRANK_GROUP
from .packing import n_groups, packed_bytes

# ---- files ------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_state(path: Path) -> str:
    """'file', 'missing', or why the path cannot be read as a file (never treated as absent)."""
    if not os.path.lexists(path):
        return "missing"
    if path.is_symlink() and not path.exists():
        return "a broken or looping symbolic link"
    if path.is_dir():
        return "a directory"
    if not path.is_file():
        return "not a regular file"
    return "file"


def require_file(path: Path, what: str = "") -> None:
    state = file_state(path)
    if state == "missing":
        raise ArtifactError(f"{path} is missing{what}")
    if state != "file":
        raise ArtifactError(f"{path} is {state}, not a readable file")


def verify_file(folder: Path, name: str, manifest: dict) -> str:
    """Compare one file's SHA-256 with the manifest's; returns the hash."""
    path = folder / name
    require_file(path, "; the artifact is incomplete")
    expected = manifest["files"][name]
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{path} does not match its SHA-256 in {MANIFEST} (expected {expected[:12]}…, got {actual[:12]}…): "
            "the file is corrupt, truncated, edited or from another artifact"
        )
    return actual


def read_checked(folder: Path, name: str, manifest: dict, verify: bool = True) -> bytes:
    """The bytes of one listed file, read once into private memory and (with `verify`) hashed
    there: what is checked is what is used, and no later change to the file (truncated, replaced,
    rewritten in place) can reach tensors built from these bytes, as it could through a mapping."""
    path = folder / name
    require_file(path, "; the artifact is incomplete")
    with open(path, "rb") as f:
        data = f.read()
    if verify:
        expected, actual = manifest["files"][name], hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ArtifactError(
                f"{path} does not match its SHA-256 in {MANIFEST} (expected {expected[:12]}…, got {actual[:12]}…): "
                "the file is corrupt, truncated, edited or from another artifact"
            )
    return data


def readable(path: Path) -> bool:
    """Whether this process may open the file for reading (without opening it)."""
    return os.access(path, os.R_OK)


# ---- tensors ----------------------------------------------------------------------------
def check_tensors(file: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  manifest_hint: str, fixed_dtype: set[str]) -> None:
    """Every expected tensor present with the expected shape (`expected`: name -> a tensor of the
    right shape, e.g. the state dict of the model built from the manifest); the dtype too for the
    names in `fixed_dtype`, float-ness for the others. Float values must be finite."""
    for key, want in expected.items():
        got = tensors.get(key)
        if got is None:
            raise ArtifactError(f"{file} lacks the tensor {key!r}")
        dtype_ok = got.dtype == want.dtype if key in fixed_dtype else got.is_floating_point() == want.is_floating_point()
        if tuple(got.shape) != tuple(want.shape) or not dtype_ok:
            raise ArtifactError(
                f"{file}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, but {manifest_hint} "
                f"call for {want.dtype} {tuple(want.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ArtifactError(f"{file}: tensor {key!r} holds NaN or infinite values")


def check_csr(file: Path, name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The ortho stream of layer `name`: crow int32 [out + 1] from 0, monotone, ending at nnz;
    col int32 [nnz] in [0, in), strictly increasing within a row; val [nnz] finite, of ortho_dtype."""
    crow, col, val = (tensors.get(f"{name}.{k}") for k in CSR_KEYS)
    for key, t in zip(CSR_KEYS, (crow, col, val)):
        if t is None:
            raise ArtifactError(f"{file} lacks the tensor {name}.{key}")
        if t.dim() != 1:
            raise ArtifactError(f"{file}: {name}.{key} must be 1-D, got shape {tuple(t.shape)}")
    n_out, n_in, nnz = spec["out_features"], spec["in_features"], spec["ortho_nnz"]
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise ArtifactError(f"{file}: {name}.ortho_crow / ortho_col must be int32, got {crow.dtype} / {col.dtype}")
    if str(val.dtype).removeprefix("torch.") != spec["ortho_dtype"]:
        raise ArtifactError(f"{file}: {name}.ortho_val is {val.dtype}, the manifest's ortho_dtype says {spec['ortho_dtype']}")
    if crow.numel() != n_out + 1:
        raise ArtifactError(f"{file}: {name}.ortho_crow has {crow.numel()} entries, expected out_features + 1 = {n_out + 1}")
    if col.numel() != nnz or val.numel() != nnz:
        raise ArtifactError(
            f"{file}: {name} has {col.numel()} column indices and {val.numel()} values; the manifest's ortho_nnz is {nnz}"
        )
    if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((crow[1:] < crow[:-1]).any()):
        raise ArtifactError(f"{file}: {name}.ortho_crow must rise monotonically from 0 to nnz = {nnz}")
    if nnz == 0:
        return
    if int(col.min()) < 0 or int(col.max()) >= n_in:
        raise ArtifactError(f"{file}: {name}.ortho_col has indices outside [0, in_features = {n_in})")
    row_start = torch.zeros(nnz, dtype=torch.bool)
    starts = crow[:-1].long()
    row_start[starts[starts < nnz]] = True
    if bool(((col[1:] <= col[:-1]) & ~row_start[1:]).any()):
        raise ArtifactError(f"{file}: {name}.ortho_col is not strictly increasing within each row")
    if not bool(torch.isfinite(val).all()):
        raise ArtifactError(f"{file}: {name}.ortho_val holds NaN or infinite values")


def check_lowrank(file: Path, name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The low-rank part of layer `name`: ortho_B [out, r] and ortho_A [r, in] of ortho_dtype,
    finite, r = the manifest's ortho_rank (both may be absent when r is 0: older artifacts); or,
    with lowrank_bits 8 / 4, its codes (check_lowrank_codes)."""
    rank, n_out, n_in = spec.get("ortho_rank", 0), spec["out_features"], spec["in_features"]
    if spec.get("lowrank_bits", 16) != 16:
        check_lowrank_codes(file, name, spec, tensors)
        return
    B, A = (tensors.get(f"{name}.{k}") for k in LOWRANK_KEYS)
    if rank == 0 and B is None and A is None:
        return
    for key, t, shape in (("ortho_B", B, (n_out, rank)), ("ortho_A", A, (rank, n_in))):
        if t is None:
            raise ArtifactError(f"{file} lacks the tensor {name}.{key} (the manifest's ortho_rank is {rank})")
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{file}: {name}.{key} is {tuple(t.shape)}, the manifest's ortho_rank {rank} calls for {shape}")
        if str(t.dtype).removeprefix("torch.") != spec["ortho_dtype"]:
            raise ArtifactError(f"{file}: {name}.{key} is {t.dtype}, the manifest's ortho_dtype says {spec['ortho_dtype']}")
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{file}: {name}.{key} holds NaN or infinite values")


def check_lowrank_codes(file: Path, name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The codes of layer `name`'s low-rank part: ortho_Aq [r, packed in] and ortho_Btq [r, packed out]
    uint8, their _scales and _zeros [r, groups of LOWRANK_GROUP] fp16 and finite, r = ortho_rank."""
    rank, bits = spec["ortho_rank"], spec["lowrank_bits"]
    for factor, n in (("ortho_Aq", spec["in_features"]), ("ortho_Btq", spec["out_features"])):
        shapes = {"": ((rank, packed_bytes(n, bits)), torch.uint8),
                  "_scales": ((rank, n_groups(n, LOWRANK_GROUP)), torch.float16),
                  "_zeros": ((rank, n_groups(n, LOWRANK_GROUP)), torch.float16)}
        for part, (shape, dtype) in shapes.items():
            key = f"{name}.{factor}{part}"
            t = tensors.get(key)
            if t is None:
                raise ArtifactError(f"{file} lacks the tensor {key} (the manifest's lowrank_bits is {bits}, ortho_rank {rank})")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ArtifactError(f"{file}: {key} is {t.dtype} {tuple(t.shape)}; lowrank_bits {bits} and ortho_rank {rank} "
                                    f"call for {dtype} {shape}")
            if dtype == torch.float16 and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{file}: {key} holds NaN or infinite values")
