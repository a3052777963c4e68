"""The libortho artifact format, in one place: the files of an artifact folder, the manifest
(`libortho.json`) that binds them, its schema, and the loader of older format versions.

An artifact folder (format version 4):

  base.safetensors   packed INT codes, fp16 scales/zeros of every decomposed layer, and every other
                     weight of the model (embeddings, norms, lm_head). Alpha 0 needs nothing else.
  ortho.safetensors  the ortho stream, per layer its sparse part S (CSR: CSR_KEYS) and its low-rank
                     part L = B·A (LOWRANK_KEYS: ortho_B [out, r], ortho_A [r, in]; or, for a layer with
                     lowrank_bits 8 / 4, its codes LOWRANK_CODE_KEYS: ortho_Aq [r, packed in] and ortho_Btq
                     [r, packed out] uint8 with fp16 _scales and _zeros [r, groups of 64], see layer.py);
                     optional, shipped separately, created 0600. Its safetensors header records the SHA-256 of the base it was cut from
                     (`tensor_file_metadata`).
  libortho.json      the manifest below.
  config.json, generation_config.json, tokenizer files.

The manifest:

  format_version  4
  config          the decomposition's OrthoConfig as a dict, or null when unknown
  layers          decomposed layer name -> {in_features, out_features, bits, group_size, symmetric,
                  bias, bias_dtype, ortho_nnz, ortho_rank, ortho_dtype, lowrank_bits}
  files           file name -> SHA-256 of every other file in the folder
  ortho           {"file": "ortho.safetensors", "base_sha256": SHA-256 of base.safetensors}, or null
                  for a base-only artifact (saved without its ortho stream: alpha is fixed at 0)
  provenance      facts about how the artifact was made that do not change between two runs of the
                  same command (libortho version, the model it was decomposed from)
  stats           the only place for wall-clock and host data (timings), so that two runs of the
                  same decomposition differ in this key alone

Older versions are upgraded when read (`upgrade`): version 3 stored L as floats only (every layer's
lowrank_bits is 16); version 2 had no low-rank part (every layer's ortho_rank is 0); version 1 (until 0.1.0) also had `ortho_base_sha256` at the top level, always an
ortho file, and free extra keys (they become provenance).
"""
from __future__ import annotations

import json
import re
from typing import Any

from .config import BITS, GROUP_SIZES, LOWRANK_BITS

MANIFEST = "libortho.json"
BASE_FILE = "base.safetensors"
ORTHO_FILE = "ortho.safetensors"
CSR_KEYS = ("ortho_crow", "ortho_col", "ortho_val")
LOWRANK_KEYS = ("ortho_B", "ortho_A")
LOWRANK_CODE_KEYS = tuple(f"ortho_{f}{part}" for f in ("Aq", "Btq") for part in ("", "_scales", "_zeros"))
ORTHO_KEYS = CSR_KEYS + LOWRANK_KEYS + LOWRANK_CODE_KEYS  # every tensor of these names lives in ortho.safetensors, never in the base
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
ORTHO_DTYPES = ("float16", "bfloat16", "float32")
BIAS_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_FEATURES = 1 << 20  # far above any linear layer today; stops absurd sizes before allocation
TOP_LEVEL_KEYS = ("format_version", "config", "layers", "files", "ortho", "provenance", "stats")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(ValueError):
    """A libortho artifact or model source is missing, corrupt, truncated or mismatched."""


def tensor_file_metadata(part: str, base_sha256: str | None = None) -> dict[str, str]:
    """The safetensors header metadata of base.safetensors (part "base") or ortho.safetensors
    (part "ortho", with the base hash it was cut from). One key holding sorted JSON: safetensors
    writes a header map of several keys in an order that changes from call to call, and the
    files must come out byte for byte."""
    fields = {"part": part} | ({} if base_sha256 is None else {"base_sha256": base_sha256})
    return {"libortho": json.dumps(fields, sort_keys=True)}


def ortho_file_base_hash(metadata: dict[str, str]) -> str | None:
    """The base hash an ortho file's header records (either format version), or None."""
    if "base_sha256" in metadata:  # format 1 wrote it as its own key
        return metadata["base_sha256"]
    try:
        fields = json.loads(metadata.get("libortho", "{}"))
    except json.JSONDecodeError:
        return None
    return fields.get("base_sha256") if isinstance(fields, dict) else None


def build_manifest(
    config: dict | None, layers: dict[str, dict], files: dict[str, str], base_sha256: str | None,
    provenance: dict, stats: dict,
) -> dict:
    """The manifest of the current version. base_sha256: the base the ortho file was cut from,
    None for a base-only artifact (then `files` must not list the ortho file)."""
    return dict(
        format_version=FORMAT_VERSION,
        config=config,
        layers=layers,
        files=files,
        ortho=None if base_sha256 is None else dict(file=ORTHO_FILE, base_sha256=base_sha256),
        provenance=provenance,
        stats=stats,
    )


def upgrade(manifest: dict) -> dict:
    """An older manifest (already type-checked) in the current version; the current one as is."""
    if manifest["format_version"] == FORMAT_VERSION:
        return manifest
    if manifest["format_version"] in (2, 3):
        rank = {} if manifest["format_version"] == 3 else {"ortho_rank": 0}
        layers = {name: {**spec, **rank, "lowrank_bits": 16} for name, spec in manifest["layers"].items()}
        return {**manifest, "format_version": FORMAT_VERSION, "layers": layers}
    extra = {k: v for k, v in manifest.items() if k not in ("format_version", "config", "layers", "files",
                                                            "ortho_base_sha256", "stats")}
    has_ortho = ORTHO_FILE in manifest["files"]
    layers = {name: {**spec, "ortho_rank": 0, "lowrank_bits": 16} for name, spec in manifest["layers"].items()}
    return build_manifest(
        manifest.get("config"), layers, manifest["files"],
        manifest["ortho_base_sha256"] if has_ortho else None, extra, manifest.get("stats") or {},
    )


def decomposition_fields(manifest: dict) -> dict:
    """What a manifest says about the decomposition, every field but the per-file hashes
    (what a load -> save round trip must keep)."""
    return {k: v for k, v in manifest.items() if k != "files"} | {"file_names": sorted(manifest["files"])}


# ---- schema ---------------------------------------------------------------------------------
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
    """One entry of the manifest's layer table (see `artifact.layer_table`)."""
    _want(where, spec, dict, "an object")
    for key in ("in_features", "out_features", "bits", "group_size", "symmetric", "bias", "ortho_nnz", "ortho_dtype"):
        if key not in spec:
            raise ArtifactError(f"{where} lacks the field {key!r}")
    n_in = _want_int(f"{where}.in_features", spec["in_features"], 1, MAX_FEATURES)
    n_out = _want_int(f"{where}.out_features", spec["out_features"], 1, MAX_FEATURES)
    _want_choice(f"{where}.bits", spec["bits"], BITS)
    _want_choice(f"{where}.group_size", spec["group_size"], GROUP_SIZES)
    _want(f"{where}.symmetric", spec["symmetric"], bool, "true or false")
    _want(f"{where}.bias", spec["bias"], bool, "true or false")
    if spec["bias"] and spec.get("bias_dtype") is not None:
        _want_choice(f"{where}.bias_dtype", spec["bias_dtype"], BIAS_DTYPES)
    _want_int(f"{where}.ortho_nnz", spec["ortho_nnz"], 0, n_in * n_out)
    if "ortho_rank" in spec:
        _want_int(f"{where}.ortho_rank", spec["ortho_rank"], 0, min(n_in, n_out))
    _want_choice(f"{where}.ortho_dtype", spec["ortho_dtype"], ORTHO_DTYPES)
    if "lowrank_bits" in spec:
        _want_choice(f"{where}.lowrank_bits", spec["lowrank_bits"], LOWRANK_BITS)


def validate_manifest(manifest: Any, file: Any) -> dict:
    """Types and ranges of every field libortho reads; the first violation is raised, naming it.
    Returns the manifest in the current format version (older versions upgraded)."""
    where = f"{file}:"
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} the manifest must be a JSON object, got {_type_name(manifest)}")
    if "format_version" not in manifest:
        raise ArtifactError(f"{where} lacks the field 'format_version'; the artifact is corrupt")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{where} format_version must be an integer, got {_type_name(version)} {version!r}")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{where} format_version is {version}; this libortho reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            + (" (upgrade libortho to read it)" if version > FORMAT_VERSION else "")
        )
    required = ("layers", "files", "ortho_base_sha256") if version == 1 else ("layers", "files", "ortho")
    for key in required:
        if key not in manifest:
            raise ArtifactError(f"{where} lacks the field {key!r}; the artifact is corrupt")
    _validate_layers(where, manifest["layers"], needs_rank=version >= 3, needs_bits=version >= 4)
    files = _validate_files(where, manifest["files"])
    if version == 1:
        base_sha = _want_sha(f"{where} ortho_base_sha256", manifest["ortho_base_sha256"])
        if base_sha != files[BASE_FILE]:
            raise ArtifactError(f"{where} ortho_base_sha256 differs from files[{BASE_FILE!r}]: the manifest is inconsistent")
    else:
        _validate_ortho(where, manifest["ortho"], files)
        unknown = set(manifest) - set(TOP_LEVEL_KEYS)
        if unknown:
            raise ArtifactError(f"{where} has unknown fields {sorted(unknown)}; version {version} has {', '.join(TOP_LEVEL_KEYS)}")
    for key in ("config", "stats", "provenance"):
        if manifest.get(key) is not None:
            _want(f"{where} {key}", manifest[key], dict, "an object or null")
    return upgrade(manifest)


def _validate_layers(where: str, layers: Any, needs_rank: bool, needs_bits: bool) -> None:
    _want(f"{where} layers", layers, dict, "an object (layer name -> settings)")
    if not layers:
        raise ArtifactError(f"{where} layers is empty: an artifact has at least one decomposed layer")
    for name, spec in layers.items():
        validate_layer(f"{where} layers[{name!r}]", spec)
        for field, needed in (("ortho_rank", needs_rank), ("lowrank_bits", needs_bits)):
            if needed and field not in spec:
                raise ArtifactError(f"{where} layers[{name!r}] lacks the field {field!r}")


def _validate_files(where: str, files: Any) -> dict:
    _want(f"{where} files", files, dict, "an object (file name -> SHA-256)")
    if BASE_FILE not in files:
        raise ArtifactError(f"{where} files must list {BASE_FILE}, got {sorted(files)}")
    for name, sha in files.items():
        if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise ArtifactError(f"{where} files has the entry {name!r}: only plain file names of the folder")
        _want_sha(f"{where} files[{name!r}]", sha)
    return files


def _validate_ortho(where: str, ortho: Any, files: dict) -> None:
    if ortho is None:
        if ORTHO_FILE in files:
            raise ArtifactError(f"{where} ortho is null (a base-only artifact) but files lists {ORTHO_FILE}")
        return
    _want(f"{where} ortho", ortho, dict, "an object or null")
    if ortho.get("file") != ORTHO_FILE:
        raise ArtifactError(f"{where} ortho.file must be {ORTHO_FILE!r}, got {ortho.get('file')!r}")
    if ORTHO_FILE not in files:
        raise ArtifactError(f"{where} ortho names {ORTHO_FILE}, but files does not list it, so it cannot be verified")
    base_sha = _want_sha(f"{where} ortho.base_sha256", ortho.get("base_sha256"))
    if base_sha != files[BASE_FILE]:
        raise ArtifactError(f"{where} ortho.base_sha256 differs from files[{BASE_FILE!r}]: the manifest is inconsistent")
