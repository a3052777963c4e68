"""Checks on a libortho artifact before any of it is used: the manifest's schema, every file's
SHA-256 against the manifest, the tensors' shapes and dtypes, and the ortho stream's CSR structure.

Threat model: the hashes catch corruption, truncation and mix-ups (a file from another
artifact, another decomposition of the same base). They do not stop an attacker who can
rewrite libortho.json as well: whoever can write the folder decides what it contains.
Every failure is an `ArtifactError` naming the file and the field or tensor.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from .quantize import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

MANIFEST = "libortho.json"
BASE_FILE = "base.safetensors"
ORTHO_FILE = "ortho.safetensors"
ORTHO_KEYS = ("ortho_crow", "ortho_col", "ortho_val")
FORMAT_VERSION = 1
ORTHO_DTYPES = ("float16", "bfloat16", "float32")
BIAS_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_FEATURES = 1 << 20  # far above any linear layer today; stops absurd sizes before allocation
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(ValueError):
    """A libortho artifact or model source is missing, corrupt, truncated or mismatched."""


# ---- manifest schema ------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    return type(value).__name__


def _want_int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass: refuse it
        raise ArtifactError(f"{where} must be an integer, got {_type_name(value)} {value!r}")
    if not lo <= value <= hi:
        raise ArtifactError(f"{where} must lie in [{lo}, {hi}], got {value}")
    return value


def _want(where: str, value: Any, kind: type | tuple, what: str) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ArtifactError(f"{where} must be {what}, got {_type_name(value)} {value!r}")
    return value


def _want_choice(where: str, value: Any, choices: tuple) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise ArtifactError(f"{where} must be one of {choices}, got {value!r}")
    return value


def _want_sha(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ArtifactError(f"{where} must be a SHA-256 (64 lower-case hex digits), got {value!r}")
    return value


def validate_layer(where: str, spec: Any) -> None:
    """One entry of the manifest's layer table (see `modelio.layer_table`)."""
    _want(where, spec, dict, "an object")
    for key in ("in_features", "out_features", "bits", "group_size", "symmetric", "bias", "ortho_nnz", "ortho_dtype"):
        if key not in spec:
            raise ArtifactError(f"{where} lacks the field {key!r}")
    n_in = _want_int(f"{where}.in_features", spec["in_features"], 1, MAX_FEATURES)
    n_out = _want_int(f"{where}.out_features", spec["out_features"], 1, MAX_FEATURES)
    _want_choice(f"{where}.bits", spec["bits"], SUPPORTED_BITS)
    _want_choice(f"{where}.group_size", spec["group_size"], SUPPORTED_GROUP_SIZES)
    _want(f"{where}.symmetric", spec["symmetric"], bool, "true or false")
    _want(f"{where}.bias", spec["bias"], bool, "true or false")
    if spec["bias"] and spec.get("bias_dtype") is not None:
        _want_choice(f"{where}.bias_dtype", spec["bias_dtype"], BIAS_DTYPES)
    _want_int(f"{where}.ortho_nnz", spec["ortho_nnz"], 0, n_in * n_out)
    _want_choice(f"{where}.ortho_dtype", spec["ortho_dtype"], ORTHO_DTYPES)


def validate_manifest(manifest: Any, file: Path) -> dict:
    """Types and ranges of every field libortho reads; the first violation is raised, naming it."""
    where = f"{file}:"
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} the manifest must be a JSON object, got {_type_name(manifest)}")
    if "format_version" not in manifest:
        raise ArtifactError(f"{where} lacks the field 'format_version'; the artifact is corrupt")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{where} format_version must be an integer, got {_type_name(version)} {version!r}")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{where} format_version is {version}; this libortho reads version {FORMAT_VERSION}")
    for key in ("layers", "files", "ortho_base_sha256"):
        if key not in manifest:
            raise ArtifactError(f"{where} lacks the field {key!r}; the artifact is corrupt")
    layers = _want(f"{where} layers", manifest["layers"], dict, "an object (layer name -> settings)")
    if not layers:
        raise ArtifactError(f"{where} layers is empty: an artifact has at least one decomposed layer")
    for name, spec in layers.items():
        validate_layer(f"{where} layers[{name!r}]", spec)
    files = _want(f"{where} files", manifest["files"], dict, "an object (file name -> SHA-256)")
    if BASE_FILE not in files:
        raise ArtifactError(f"{where} files must list {BASE_FILE}, got {sorted(files)}")
    for name, sha in files.items():
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise ArtifactError(f"{where} files has the entry {name!r}: only plain file names of the folder")
        _want_sha(f"{where} files[{name!r}]", sha)
    base_sha = _want_sha(f"{where} ortho_base_sha256", manifest["ortho_base_sha256"])
    if base_sha != files[BASE_FILE]:
        raise ArtifactError(f"{where} ortho_base_sha256 differs from files[{BASE_FILE!r}]: the manifest is inconsistent")
    for key in ("config", "stats"):
        if manifest.get(key) is not None:
            _want(f"{where} {key}", manifest[key], dict, "an object or null")
    return manifest


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
    crow, col, val = (tensors.get(f"{name}.{k}") for k in ORTHO_KEYS)
    for key, t in zip(ORTHO_KEYS, (crow, col, val)):
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
