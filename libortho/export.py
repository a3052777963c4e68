"""Export an artifact's public base (alpha 0) to formats existing engines load, and its low-rank
ortho part to a PEFT LoRA adapter.

compressed-tensors "pack-quantized" (what transformers and vLLM load as any such checkpoint):

  model.safetensors  per decomposed linear <name>:
                       <name>.weight_packed  int32 [out, in·bits/32]: the signed codes q = C - 2^(bits-1)
                                             in [-2^(bits-1), 2^(bits-1) - 1], offset by 2^(bits-1) and
                                             packed 32/bits to an int32 by compressed-tensors' own
                                             `pack_to_int32` (element k of a row at bit k·bits, low first)
                       <name>.weight_scale   float16 [out, in / group_size]: libortho's scales, unchanged
                       <name>.weight_shape   int64 [2]: (out, in)
                       <name>.bias           as stored in the artifact
                     every other tensor (embeddings, norms, lm_head, undecomposed linears) as stored.
  config.json        the model's config plus `quantization_config` (symmetric INT, strategy group).
  tokenizer and generation files, copied.

The engine dequantizes W = q · scale per group, which is libortho's W_base = (C - Z) · S exactly when
Z = 2^(bits-1) (the symmetric zero) and every group is full: so only symmetric INT4 / INT8 bases whose
group size divides every layer's input width are exported; anything else is refused before a byte is
written. The ortho stream is never opened for the base export.

PEFT LoRA adapter (`lora`): adapter_config.json and adapter_model.safetensors with, per layer of rank
r > 0, base_model.model.<name>.lora_A.weight = ortho_A [r, in] and .lora_B.weight = ortho_B [out, r],
lora_alpha = r per layer (scaling 1), so base + adapter = W_base + B·A. The sparse part S of the ortho
stream is not in the adapter: base + adapter is alpha 1 only for an ortho stream that is low-rank alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import artifact
from . import artifact_check as check
from .artifact_format import BASE_FILE, MANIFEST, ORTHO_FILE, ORTHO_KEYS, ArtifactError
from .fsutil import apply_umask, check_output_dir, staged_dir
from .lowrank import factors_from_codes

FORMATS = ("compressed-tensors",)
EXPORTABLE_BITS = (4, 8)
WEIGHTS_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _require(module: str, package: str):
    """Import an optional dependency, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ArtifactError(f"exporting needs the {package} package: pip install {package}") from None


def exportable_problems(layers: dict[str, dict]) -> list[str]:
    """Why the base of a manifest's layer table cannot be written as pack-quantized (empty: it can)."""
    problems = []
    for name, spec in layers.items():
        if not spec["symmetric"]:
            problems.append(f"{name} has an asymmetric base (per-group zeros): decompose without --asymmetric")
        elif spec["bits"] not in EXPORTABLE_BITS:
            problems.append(f"{name} is INT{spec['bits']}: only INT4 and INT8 bases export; decompose with --bits 4 or 8")
        elif spec["in_features"] % spec["group_size"]:
            problems.append(f"{name} has {spec['in_features']} inputs, not a multiple of its group size "
                            f"{spec['group_size']}: decompose with a --group-size that divides it")
    return problems


def _check_symmetric_zeros(name: str, bits: int, zeros: torch.Tensor) -> None:
    """Every zero of a symmetric layer is 2^(bits-1), so that C - Z is the signed code."""
    if not bool((zeros == 2 ** (bits - 1)).all()):
        raise ArtifactError(f"{name}: its zeros are not the symmetric constant {2 ** (bits - 1)}; "
                            "this base cannot be exported as symmetric INT (decompose without --asymmetric)")


def packed_layer(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one decomposed linear from its libortho buffers."""
    from .packing import unpack

    helpers = _require("compressed_tensors.compressors.pack_quantized.helpers", "compressed-tensors")
    bits, n_in, n_out = spec["bits"], spec["in_features"], spec["out_features"]
    _check_symmetric_zeros(name, bits, tensors[f"{name}.zeros"])
    codes = unpack(tensors[f"{name}.qweight"], bits, n_in).to(torch.int16)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # in [-2^(bits-1), 2^(bits-1) - 1]
    out = {
        f"{name}.weight_packed": helpers.pack_to_int32(signed, bits).contiguous(),
        f"{name}.weight_scale": tensors[f"{name}.scales"].contiguous(),
        f"{name}.weight_shape": torch.tensor([n_out, n_in], dtype=torch.int64),
    }
    if spec["bias"]:
        out[f"{name}.bias"] = tensors[f"{name}.bias"].contiguous()
    return out


def quantization_config(layers: dict[str, dict], ignore: list[str]) -> dict:
    """The `quantization_config` of config.json: one config group per (bits, group size); its
    targets are "Linear" when every decomposed layer shares one, else the layers' names."""
    qz = _require("compressed_tensors.quantization", "compressed-tensors")
    schemes: dict[tuple[int, int], list[str]] = {}
    for name, spec in layers.items():
        schemes.setdefault((spec["bits"], spec["group_size"]), []).append(name)
    groups = {}
    for i, ((bits, group_size), names) in enumerate(sorted(schemes.items())):
        weights = qz.QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
        targets = ["Linear"] if len(schemes) == 1 else names
        groups[f"group_{i}"] = qz.QuantizationScheme(targets=targets, weights=weights)
    config = qz.QuantizationConfig(config_groups=groups, format="pack-quantized", ignore=ignore,
                                   quantization_status="compressed")
    return json.loads(config.model_dump_json(exclude_none=False))


def _linear_names(config: dict) -> list[str]:
    """Names of every nn.Linear of the model config.json describes (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a config it cannot build
        raise ArtifactError(f"config.json does not describe a causal language model transformers builds: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _metadata_files(path: Path, manifest: dict) -> dict[str, bytes]:
    """config.json, generation and tokenizer files of the artifact, each read once and checked."""
    names = [n for n in manifest["files"] if n not in (BASE_FILE, ORTHO_FILE)]
    if "config.json" not in names:
        raise ArtifactError(f"{path / MANIFEST} lists no config.json; load and save the artifact with this libortho first")
    return {n: check.read_checked(path, n, manifest) for n in names}


def export_compressed_tensors(path: str | Path, out: str | Path, lora: str | Path | None = None) -> Path:
    """Write the artifact's alpha-0 base at `out` as a compressed-tensors pack-quantized checkpoint
    and, with `lora`, its low-rank ortho part as a PEFT LoRA adapter there; both atomically, into
    new (or empty) folders. Every check runs before anything is written. Returns `out`."""
    path = Path(path)
    manifest = artifact.read_manifest(path)
    layers = manifest["layers"]
    problems = exportable_problems(layers)
    if problems:
        more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
        raise ArtifactError(f"{path} cannot be exported as compressed-tensors: {problems[0]}{more}")
    if lora is not None:
        _check_lora_source(path, manifest)
    _require("compressed_tensors", "compressed-tensors")
    target = check_output_dir(out)
    lora_target = check_output_dir(lora) if lora is not None else None
    if lora_target is not None and lora_target == target:
        raise ArtifactError("the adapter folder must differ from the exported model's folder")

    files = _metadata_files(path, manifest)
    config = json.loads(files.pop("config.json"))
    base, _ = artifact._read_tensors(path, BASE_FILE, manifest)
    tensors = _base_tensors(base, layers)
    ignore = [n for n in _linear_names(config) if n not in layers]
    config["quantization_config"] = quantization_config(layers, ignore)

    from safetensors.torch import save_file

    with staged_dir(target) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        apply_umask(tmp)
    if lora_target is not None:
        export_lora(path, lora_target, manifest)
    return target


def _base_tensors(base: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: every decomposed layer packed, everything else as stored."""
    own = {f"{n}.{k}" for n in layers for k in ("qweight", "scales", "zeros", "bias")}
    leaked = [k for k in base if k.rsplit(".", 1)[-1] in ORTHO_KEYS]
    if leaked:
        raise ArtifactError(f"{BASE_FILE} holds ortho tensors ({leaked[0]}, ...); the artifact is corrupt")
    tensors = {k: v.contiguous() for k, v in base.items() if k not in own}
    for name, spec in layers.items():
        tensors.update(packed_layer(name, spec, base))
    return tensors


# ---- the low-rank ortho part as a PEFT LoRA adapter -------------------------------------------
def _check_lora_source(path: Path, manifest: dict) -> None:
    if manifest["ortho"] is None:
        raise ArtifactError(f"{path} is a base-only artifact (no ortho stream): there is no low-rank part for --lora")
    if not any(spec.get("ortho_rank", 0) > 0 for spec in manifest["layers"].values()):
        raise ArtifactError(f"{path} has no low-rank ortho part (every layer's rank is 0): nothing to write as a LoRA "
                            "adapter; decompose with --ortho-budget and --lowrank-share above 0")
    state = check.file_state(path / ORTHO_FILE)
    if state != "file" or not check.readable(path / ORTHO_FILE):
        why = state if state != "file" else "not readable by this user"
        raise ArtifactError(f"--lora needs {path / ORTHO_FILE}, which is {why}")


def lora_config(ranks: dict[str, int]) -> dict:
    """adapter_config.json: the layers of rank > 0, each with lora_alpha = its rank (scaling 1)."""
    r = max(ranks.values())
    return dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=None, inference_mode=True,
        r=r, lora_alpha=r, lora_dropout=0.0, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
        target_modules=sorted(ranks), rank_pattern=dict(sorted(ranks.items())),
        alpha_pattern=dict(sorted(ranks.items())), modules_to_save=None, init_lora_weights=True,
    )


def export_lora(path: str | Path, out: str | Path, manifest: dict | None = None) -> Path:
    """Write the artifact's low-rank ortho part L = B·A as a PEFT LoRA adapter folder at `out`
    (the sparse part S is not included). Returns `out`."""
    from safetensors.torch import save_file

    path = Path(path)
    manifest = manifest or artifact.read_manifest(path)
    _check_lora_source(path, manifest)
    target = check_output_dir(out)
    ortho = artifact._read_ortho(path, manifest, verify=True)
    ranks = {n: s["ortho_rank"] for n, s in manifest["layers"].items() if s.get("ortho_rank", 0) > 0}
    tensors = {}
    for name in ranks:
        B, A = _factors(ortho, name, manifest["layers"][name])
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    with staged_dir(target) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(lora_config(ranks), indent=2) + "\n")
        apply_umask(tmp, private={ADAPTER_WEIGHTS})  # it carries part of what alpha 0 hides
    return target


def _factors(ortho: dict[str, torch.Tensor], name: str, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one layer as stored, or its codes' values in the ortho dtype (an adapter holds floats)."""
    if spec.get("lowrank_bits", 16) == 16:
        return ortho[f"{name}.ortho_B"], ortho[f"{name}.ortho_A"]
    return factors_from_codes(lambda key: ortho[f"{name}.{key}"], spec["lowrank_bits"], spec["in_features"],
                              spec["out_features"], getattr(torch, spec["ortho_dtype"]))


def export(path: str | Path, out: str | Path, format: str = "compressed-tensors", lora: str | Path | None = None) -> Path:
    """Export an artifact in `format` (one of FORMATS); see the module docstring."""
    if format not in FORMATS:
        raise ArtifactError(f"format {format!r} is not known; choose one of {', '.join(FORMATS)}")
    return export_compressed_tensors(path, out, lora)
