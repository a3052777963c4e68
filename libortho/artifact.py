"""libortho artifacts: write (`save`) and read (`load`) a decomposed model; safetensors + JSON, never pickle.

The folder's files and the manifest are defined in artifact_format.py. Everything read is first
checked against libortho.json (artifact_check.py). The model's OrthoState (state.py) is what
`save` writes into the manifest and what `load` rebuilds from it, so load -> save keeps the
config, layer table, provenance and stats.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import jsontext
from . import artifact_check as check
from . import artifact_format as fmt
from .artifact_check import sha256_file
from .artifact_format import BASE_FILE, MANIFEST, ORTHO_FILE, ORTHO_KEYS, ArtifactError
from .config import OrthoConfig
from .fsutil import apply_umask, check_output_dir, staged_dir
from .hf_model import replace_submodule
from .layer import OrthoLinear, ortho_layers
from .state import OrthoState, attach, state_of
from .switch import AlphaState
from .remote_code import refuse_custom_code


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


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
            ortho_rank=m.ortho_rank,
            ortho_dtype=str(m.ortho_val.dtype).removeprefix("torch."),
            lowrank_bits=m.lowrank_bits,
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


def save(
    model: nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False, ortho_mode: int | None = 0o600,
) -> Path:
    """Write a decomposed model as an artifact folder, atomically (a temp folder renamed at the end).

    The manifest comes from the model's OrthoState: a model that was loaded and is saved again
    keeps its config, provenance and stats; at the dtypes it was stored in (float32 on the CPU
    unless `load` was given another dtype), every tensor file comes out byte for byte. A model
    loaded without its ortho stream saves as a base-only artifact (no ortho file, manifest
    ``"ortho": null``).

    The folder, base, manifest and tokenizer files get the modes the umask gives; ortho.safetensors
    gets `ortho_mode` (default 0600, owner only, because it carries what alpha = 0 hides;
    None = the umask like the rest). A symlinked `out_dir` is written where it points.
    """
    from safetensors.torch import save_file

    if not ortho_layers(model):
        raise ArtifactError("the model has no libortho layers; decompose it before saving")
    state = state_of(model)
    target = check_output_dir(out_dir, overwrite_if=is_artifact if overwrite else None)
    kept_mode = target.stat().st_mode & 0o7777 if target.is_dir() else None
    with staged_dir(target) as tmp:
        base, ortho = _split_state(model)
        save_file(base, tmp / BASE_FILE, metadata=fmt.tensor_file_metadata("base"))
        base_hash = sha256_file(tmp / BASE_FILE)
        if state.ortho_loaded:
            save_file(ortho, tmp / ORTHO_FILE, metadata=fmt.tensor_file_metadata("ortho", base_hash))
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            with contextlib.suppress(Exception):  # an invalid generation config is not worth losing the artifact
                model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = fmt.build_manifest(
            state.config.to_dict() if state.config is not None else None, layer_table(model), files,
            base_hash if state.ortho_loaded else None, state.provenance, state.stats,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        apply_umask(tmp, private={ORTHO_FILE} if ortho_mode is not None else None, private_mode=ortho_mode or 0o600)
        if kept_mode is not None:  # an existing (empty or overwritten) folder keeps its mode
            tmp.chmod(kept_mode)
    return target


def read_manifest(path: str | Path) -> dict:
    """The validated manifest of an artifact folder (every schema violation names its field)."""
    path = Path(path)
    file = path / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder; a libortho artifact is a folder with {MANIFEST}")
    state = check.file_state(file)
    if state == "missing":
        if (path / "config.json").exists():
            raise ArtifactError(f"{path} is a Hugging Face model folder, not a libortho artifact ({MANIFEST} is missing)")
        if not any(path.iterdir()):
            raise ArtifactError(f"{path} is an empty folder, not a libortho artifact")
        raise ArtifactError(f"{path} is not a libortho artifact: {MANIFEST} is missing")
    if state != "file":
        raise ArtifactError(f"{file} is {state}, not a readable file")
    try:
        manifest = jsontext.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{file} is not valid JSON ({err}); the artifact is corrupt") from err
    return fmt.validate_manifest(manifest, file)


def _tensors_from_bytes(data: bytes, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file held in memory; the tensors own copies."""
    from safetensors.torch import load as load_safetensors

    try:
        header_len = int.from_bytes(data[:8], "little")
        metadata = jsontext.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        return load_safetensors(data), metadata
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ArtifactError(f"{file} cannot be read as safetensors ({err}); the file is corrupt or truncated") from err


def _read_tensors(folder: Path, name: str, manifest: dict, verify: bool = True):
    """(tensors, metadata) of a listed tensor file, read once, checked, parsed from memory."""
    return _tensors_from_bytes(check.read_checked(folder, name, manifest, verify), folder / name)


def verify_files(path: str | Path, with_ortho: bool = True) -> dict[str, str]:
    """Check every file the manifest lists against its SHA-256; the ortho file only when
    `with_ortho` (else it is only looked at, never opened). Returns name -> status."""
    path = Path(path)
    manifest = read_manifest(path)
    status = {}
    for name in manifest["files"]:
        if name == ORTHO_FILE and not with_ortho:
            status[name] = ortho_file_status(path)
            continue
        if name == ORTHO_FILE and check.file_state(path / name) == "missing":
            status[name] = "missing (optional: alpha stays 0)"
            continue
        check.verify_file(path, name, manifest)
        status[name] = "verified"
    return status


def ortho_file_status(path: Path) -> str:
    """What can be said of ortho.safetensors without opening it: present or not, size, readable."""
    file = Path(path) / ORTHO_FILE
    state = check.file_state(file)
    if state == "missing":
        return "missing (optional: alpha stays 0)"
    if state != "file":
        return f"{state} (unusable: alpha stays 0)"
    size = file.stat().st_size
    access = "readable" if check.readable(file) else "not readable by this user (alpha stays 0)"
    return f"present, {size} bytes, {access}; not opened (--verify-ortho hashes it)"


def verify_artifact(path: str | Path, verify_ortho: bool = False) -> dict[str, str]:
    """For `info`: every file against its SHA-256 and, with `verify_ortho`, the ortho stream's
    hash and CSR structure too; without it the ortho file is stat-ed, never opened."""
    path = Path(path)
    manifest = read_manifest(path)
    status = verify_files(path, with_ortho=verify_ortho)
    if status.get(ORTHO_FILE) == "verified":
        ortho, _ = _read_tensors(path, ORTHO_FILE, manifest)
        for name, spec in manifest["layers"].items():
            check.check_csr(path / ORTHO_FILE, name, spec, ortho)
            check.check_lowrank(path / ORTHO_FILE, name, spec, ortho)
    return status


def _staged_metadata(path: Path, manifest: dict, stage: Path, verify: bool) -> Path:
    """Copy the config and tokenizer files into `stage`, each read once and checked as read;
    transformers reads only those copies, so neither a later change to a file nor a file dropped
    into the folder (e.g. custom code) is ever seen. Artifacts whose manifest lists only the two
    tensor files (older libortho) are read from the folder itself."""
    listed = [n for n in manifest["files"] if n not in (BASE_FILE, ORTHO_FILE)]
    if not listed:
        return path
    for name in listed:
        (stage / name).write_bytes(check.read_checked(path, name, manifest, verify))
    return stage


def load(
    path: str | Path,
    alpha: float = 0.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    with_ortho: bool | None = None,
    verify: bool = True,
):
    """(model, tokenizer) from an artifact folder: a ready transformers model, `generate` works.

    Alpha starts at `alpha` = 0: ask for more explicitly. with_ortho=None loads the ortho stream
    when ortho.safetensors is present and this user may read it; False never opens it (alpha is
    then fixed at 0: what an alpha-0 caller should ask for). Every file is read once into memory
    and checked against libortho.json there (verify=False skips the hashes, never the structure
    checks), so the tensors in use are the bytes that were checked.
    dtype is the activation / non-quantized weight dtype (default float32 on CPU, float16 on CUDA).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    with_ortho = _wants_ortho(path, manifest, alpha, with_ortho)
    base, _ = _read_tensors(path, BASE_FILE, manifest, verify)
    ortho = _read_ortho(path, manifest, verify) if with_ortho else {}

    with tempfile.TemporaryDirectory(prefix=f"libortho-meta-{os.getpid()}-") as stage:  # owner pid in the name
        source = _staged_metadata(path, manifest, Path(stage), verify)
        refuse_custom_code(source, shown_as=path)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        except Exception as err:  # transformers raises many types for a bad config.json
            raise ArtifactError(f"{path / 'config.json'} is not a usable model config: {str(err).splitlines()[0]}") from err
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        except Exception as err:  # and for bad tokenizer files (tokenizers' own exception types included)
            raise ArtifactError(f"{path} has broken tokenizer files: {str(err).splitlines()[0]}") from err
    # The skeleton is built on the meta device: no random initialisation of weights the files replace
    # (at 8B that would be 32 GB of host memory and minutes of CPU).
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except Exception as err:
            raise ArtifactError(f"{path / 'config.json'} does not describe a causal language model: {str(err).splitlines()[0]}") from err
        for name, spec in manifest["layers"].items():
            _install_layer(model, path, name, spec, with_ortho)
    _check_against_model(model, path, base, ortho, with_ortho)
    model.load_state_dict({**base, **ortho}, strict=False, assign=True)
    del base, ortho  # the model owns the tensors now
    model.tie_weights()
    _materialize_unstored(model, path)
    _cast_float_params(model, dtype)
    model.to(device).eval()  # parameter by parameter: each host copy is let go as its device copy is made
    switch = AlphaState(default=0.0, ortho_available=with_ortho)
    switch.default = switch.check(alpha)
    attach(model, _state_from_manifest(manifest, switch, path), ortho_layers(model))
    if device.type == "cuda":
        from . import kernels

        if kernels.available():
            kernels.prepare(model)  # convert the ortho stream to the kernel layout once, now
    return model, tokenizer


def _wants_ortho(path: Path, manifest: dict, alpha: float, with_ortho: bool | None) -> bool:
    """Whether to load the ortho stream, or ArtifactError when the request cannot be met."""
    file = path / ORTHO_FILE
    state = check.file_state(file)
    if state not in ("file", "missing"):
        raise ArtifactError(f"{file} is {state}, not a readable file")
    if manifest["ortho"] is None and (with_ortho or alpha > 0):
        raise ArtifactError(f"{path} is a base-only artifact (saved without its ortho stream): alpha is fixed at 0")
    usable = state == "file" and manifest["ortho"] is not None
    if with_ortho is None:
        with_ortho = usable and check.readable(file)  # alpha 0 never needs the private file
    if with_ortho and state == "missing":
        raise ArtifactError(f"{file} is missing; load with alpha=0 / without the ortho stream")
    if with_ortho and not check.readable(file):
        raise ArtifactError(f"{file} is not readable by this user; alpha above 0 needs it, alpha 0 does not")
    if alpha > 0 and not with_ortho:
        why = "missing" if state == "missing" else ("not readable by this user" if not check.readable(file) else "not loaded")
        raise ArtifactError(f"alpha={alpha} needs the ortho stream, but {file} is {why}; use alpha=0 or provide the ortho file")
    return bool(with_ortho)


def _read_ortho(path: Path, manifest: dict, verify: bool) -> dict[str, torch.Tensor]:
    """The ortho stream's tensors, checked against the manifest, its base and its CSR structure."""
    ortho, meta = _read_tensors(path, ORTHO_FILE, manifest, verify)
    cut_from = fmt.ortho_file_base_hash(meta)
    if cut_from != manifest["ortho"]["base_sha256"]:
        raise ArtifactError(
            f"{path / ORTHO_FILE} was cut from a different base (its base hash {str(cut_from)[:12]}… "
            f"!= {manifest['ortho']['base_sha256'][:12]}… of {BASE_FILE}); use the ortho file produced together with this base"
        )
    for name, spec in manifest["layers"].items():
        check.check_csr(path / ORTHO_FILE, name, spec, ortho)
        check.check_lowrank(path / ORTHO_FILE, name, spec, ortho)
    return ortho


def _state_from_manifest(manifest: dict, switch: AlphaState, path: Path) -> OrthoState:
    config = None
    if manifest.get("config") is not None:
        try:
            config = OrthoConfig(**manifest["config"])
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"{path / MANIFEST}: config is not a valid decomposition config ({err})") from None
    return OrthoState(switch, config, dict(manifest.get("provenance") or {}), dict(manifest.get("stats") or {}))


def _install_layer(model: nn.Module, path: Path, name: str, spec: dict, with_ortho: bool) -> None:
    try:
        current = model.get_submodule(name)
    except AttributeError:
        current = None
    if not isinstance(current, nn.Module) or not hasattr(current, "weight"):
        raise ArtifactError(
            f"{path / 'config.json'} describes a model without the linear layer {name!r} that {MANIFEST} lists "
            "(layer count or architecture differ)"
        )
    layer = OrthoLinear(
        spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["symmetric"],
        bias=spec["bias"], ortho_nnz=int(spec["ortho_nnz"]) if with_ortho else 0,
        ortho_rank=int(spec["ortho_rank"]) if with_ortho else 0, ortho_dtype=getattr(torch, spec["ortho_dtype"]),
        bias_dtype=getattr(torch, spec.get("bias_dtype") or "float32"), lowrank_bits=int(spec["lowrank_bits"]),
    )
    replace_submodule(model, name, layer)


def _check_against_model(model: nn.Module, path: Path, base: dict, ortho: dict, with_ortho: bool) -> None:
    """Every tensor the model built from config.json + the manifest needs, with the right shape and dtype."""
    expected = model.state_dict()
    tied = _tied_keys(model)
    wanted_base = {k: v for k, v in expected.items() if k.rsplit(".", 1)[-1] not in ORTHO_KEYS and k not in tied}
    unexpected = set(base) - set(expected)
    if unexpected:
        raise ArtifactError(
            f"{path / BASE_FILE} holds tensors {sorted(unexpected)[:3]} that the model of config.json does not have "
            "(layer count or architecture differ)"
        )
    # Base tensors are compared against the shapes the config and manifest imply (e.g. a `bits`
    # edited from 4 to 8 gives a different packed width than the stored codes).
    # Only libortho's own buffers have a fixed dtype; other float weights are cast to `dtype` later.
    fixed = {k for k in wanted_base if k.rsplit(".", 1)[0] in _ortho_names(model)}
    check.check_tensors(path / BASE_FILE, base, wanted_base, f"config.json and {MANIFEST}", fixed)
    if with_ortho:
        extra = set(ortho) - set(expected)
        if extra:
            raise ArtifactError(f"{path / ORTHO_FILE} holds tensors {sorted(extra)[:3]} of no layer in {MANIFEST}")


def _materialize_unstored(model: nn.Module, path: Path) -> None:
    """Give real tensors to what the files do not store: the empty ortho buffers of a layer loaded without
    its ortho stream (their built value: zeros) and buffers the model computes (rotary frequencies)."""
    from .streaming import StreamingUnsupported, rebuild_computed_buffers

    for layer in ortho_layers(model):
        for name, t in layer._buffers.items():
            if t is not None and t.is_meta:
                layer._buffers[name] = torch.zeros(t.shape, dtype=t.dtype)
    try:
        rebuild_computed_buffers(model, torch.device("cpu"))
    except StreamingUnsupported as err:
        raise ArtifactError(f"{path}: {err}") from None
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ArtifactError(f"{path / BASE_FILE} holds no tensor for {', '.join(missing[:3])}; the artifact is incomplete")


def _ortho_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, OrthoLinear)}


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
