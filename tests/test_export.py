"""`libortho export`: the alpha-0 base as a compressed-tensors pack-quantized checkpoint, and the
low-rank ortho part as a PEFT LoRA adapter, checked against libortho's own forward.

Tolerance, fixed from the arithmetic before any run: the exported weights are libortho's integer
codes times its float16 scales, both exactly representable, and the engine dequantizes them in the
model's float32; the only admissible differences are float32 summation order (~1e-6 relative) or,
at worst, one float16 rounding of a weight (relative 2^-11). So logits must agree within
2^-11 · max|logits| (float16's unit roundoff, relative to the logits' scale).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import libortho
from libortho.artifact_format import ArtifactError
from libortho.export import export
from conftest import TEXT, tiny_model

pytest.importorskip("compressed_tensors")

FP16_UNIT = 2.0**-11


def _decompose(tmp_path_factory, tokenizer, name: str, **fields):
    model = tiny_model("llama")
    config = libortho.OrthoConfig(calib_tokens=512, seq_len=128, **fields)
    libortho.decompose(model, tokenizer, TEXT, config, progress=False)
    path = tmp_path_factory.mktemp(name) / "artifact"
    libortho.save(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def lowrank_artifact(tmp_path_factory, tokenizer):
    """INT4 g32 symmetric, ortho stream low-rank only (the byte budget all to L = B·A)."""
    return _decompose(tmp_path_factory, tokenizer, "lowrank", bits=4, group_size=32, ortho_budget=0.25, lowrank_share=1.0)


@pytest.fixture(scope="module")
def coded_lowrank_artifact(tmp_path_factory, tokenizer):
    """As lowrank_artifact, with L stored as 4-bit codes (lowrank_bits 4)."""
    return _decompose(tmp_path_factory, tokenizer, "coded", bits=4, group_size=32, ortho_budget=0.25, lowrank_share=1.0,
                      lowrank_bits=4)


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory, tokenizer):
    """INT8 g32 symmetric with a sparse ortho stream S."""
    return _decompose(tmp_path_factory, tokenizer, "int8", bits=8, group_size=32, ortho_ratio=0.02)


def _ids(tokenizer):
    return tokenizer(TEXT[:96], return_tensors="pt").input_ids


def _assert_logits_close(got: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (got.float() - ref.float()).abs().max().item()
    bound = FP16_UNIT * ref.abs().max().item()
    assert diff <= bound, f"max |logit difference| {diff:.3e} exceeds the float16 bound {bound:.3e}"
    return diff


def _hf(path, tokenizer):
    """The exported checkpoint as transformers loads it. transformers (with compressed-tensors) keeps
    the packed tensors until the first forward pass and dequantizes them there into plain weights:
    one forward, so that the model holds nn.Linear weights (what PEFT wraps)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model(_ids(tokenizer))
    return model


@pytest.mark.parametrize("which", ["lowrank_artifact", "int8_artifact"])
def test_export_loads_in_transformers_and_matches_alpha_0(which, request, tokenizer, tmp_path):
    path = request.getfixturevalue(which)
    out = export(path, tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    manifest = json.loads((path / "libortho.json").read_text())
    bits = next(iter(manifest["layers"].values()))["bits"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] | {"num_bits": bits} == dict(num_bits=bits, type="int", symmetric=True, strategy="group",
                                                         group_size=32, dynamic=False)

    exported = _hf(out, tokenizer)
    ref, _ = libortho.load(path, alpha=0.0, with_ortho=False)
    for name in manifest["layers"]:  # the engine's dequantized weight is W_base, bit for bit
        assert torch.equal(exported.get_submodule(name).weight, ref.get_submodule(name).base_weight()), name
    with torch.no_grad():
        diff = _assert_logits_close(exported(_ids(tokenizer)).logits, ref(_ids(tokenizer)).logits)
    print(f"{which}: max |logit difference| vs libortho alpha 0 = {diff:.3e}")


def test_no_byte_of_the_ortho_stream_is_exported(int8_artifact, lowrank_artifact, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    for path in (int8_artifact, lowrank_artifact):
        bare = tmp_path / f"{path.parent.name}-bare"
        shutil.copytree(path, bare)
        (bare / "ortho.safetensors").unlink()  # the base export never needs (or opens) it
        out = export(bare, tmp_path / f"{path.parent.name}-ct")
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
            + (["special_tokens_map.json"] if (path / "special_tokens_map.json").exists() else []))
        with safe_open(out / "model.safetensors", "pt") as f:
            names = list(f.keys())
        assert names and not any("ortho" in n or "zeros" in n or "qweight" in n for n in names)
        blob = (out / "model.safetensors").read_bytes()
        ortho = load_file(path / "ortho.safetensors")
        pieces = [t for k, t in ortho.items() if k.rsplit(".", 1)[-1] in ("ortho_val", "ortho_A", "ortho_B") and t.numel() >= 4]
        assert pieces, "the artifact has an ortho stream to look for"
        for t in pieces:
            assert t.contiguous().view(torch.uint8).numpy().tobytes() not in blob
    # the sparse stream's values really are there to be found in the artifact's own private file
    ortho = load_file(int8_artifact / "ortho.safetensors")
    assert sum(t.numel() for k, t in ortho.items() if k.endswith("ortho_val")) > 0


@pytest.mark.parametrize("fields, message", [
    (dict(symmetric=False), "asymmetric base .*decompose without --asymmetric"),
    (dict(bits=3), "INT3: only INT4 and INT8 bases export; decompose with --bits 4 or 8"),
    (dict(group_size=64), "160 inputs, not a multiple of its group size 64: decompose with a --group-size"),
])
def test_unexportable_bases_are_refused_before_anything_is_written(fields, message, tmp_path_factory, tokenizer, tmp_path):
    path = _decompose(tmp_path_factory, tokenizer, "refused", method="rtn", **{"group_size": 32, **fields})
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match=message):
        export(path, out, lora=tmp_path / "adapter")
    assert not out.exists() and not (tmp_path / "adapter").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_linears_left_out_of_the_decomposition_are_ignored_and_stay_float(tmp_path_factory, tokenizer, tmp_path):
    path = _decompose(tmp_path_factory, tokenizer, "partial", method="rtn", group_size=32, include="mlp")
    out = export(path, tmp_path / "ct")
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(ignore) == sorted(["lm_head"] + [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"])
    exported = _hf(out, tokenizer)
    ref, _ = libortho.load(path, alpha=0.0, with_ortho=False)
    with torch.no_grad():
        diff = _assert_logits_close(exported(_ids(tokenizer)).logits, ref(_ids(tokenizer)).logits)
    print(f"partial: max |logit difference| vs libortho alpha 0 = {diff:.3e}")


def test_a_missing_compressed_tensors_says_what_to_install():
    from libortho.export import _require

    with pytest.raises(ArtifactError, match="pip install compressed-tensors"):
        _require("compressed_tensors_not_installed_here", "compressed-tensors")


def test_zeros_that_are_not_the_symmetric_constant_are_refused(lowrank_artifact):
    from safetensors.torch import load_file

    from libortho.export import packed_layer

    manifest = json.loads((lowrank_artifact / "libortho.json").read_text())
    name, spec = next(iter(manifest["layers"].items()))
    base = load_file(lowrank_artifact / "base.safetensors")
    assert packed_layer(name, spec, base)[f"{name}.weight_packed"].dtype == torch.int32
    base[f"{name}.zeros"][0, 0] += 1
    with pytest.raises(ArtifactError, match="not the symmetric constant 8"):
        packed_layer(name, spec, base)


def test_an_existing_non_empty_out_and_a_lora_without_low_rank_part_are_refused(int8_artifact, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        export(int8_artifact, taken)
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    with pytest.raises(ArtifactError, match="no low-rank ortho part"):
        export(int8_artifact, tmp_path / "out", lora=tmp_path / "adapter")
    assert not (tmp_path / "out").exists() and not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("which", ["lowrank_artifact", "coded_lowrank_artifact"])
def test_lora_adapter_through_peft_matches_alpha_1(which, request, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    lowrank_artifact = request.getfixturevalue(which)
    manifest = json.loads((lowrank_artifact / "libortho.json").read_text())
    ranks = {n: s["ortho_rank"] for n, s in manifest["layers"].items()}
    assert all(s["ortho_nnz"] == 0 for s in manifest["layers"].values())  # the ortho stream is L alone
    assert max(ranks.values()) > 0
    out = export(lowrank_artifact, tmp_path / "ct", lora=tmp_path / "adapter")
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600
    assert adapter["rank_pattern"] == adapter["alpha_pattern"] == {n: r for n, r in ranks.items() if r > 0}

    model = peft.PeftModel.from_pretrained(_hf(out, tokenizer), tmp_path / "adapter").eval()
    for name, r in ranks.items():
        if r > 0:
            layer = model.base_model.model.get_submodule(name)
            assert layer.lora_A["default"].weight.shape[0] == r and layer.scaling["default"] == 1.0
    ref, _ = libortho.load(lowrank_artifact, alpha=1.0)
    with torch.no_grad():
        got = model(_ids(tokenizer)).logits
        want = ref(_ids(tokenizer)).logits
        base = _hf(out, tokenizer)(_ids(tokenizer)).logits
    diff = _assert_logits_close(got, want)
    assert (base - want).abs().max().item() > FP16_UNIT * want.abs().max().item()  # the adapter is not a no-op
    print(f"LoRA: max |logit difference| vs libortho alpha 1 = {diff:.3e}; base vs alpha 1 = "
          f"{(base - want).abs().max().item():.3e}")


def test_cli_export_end_to_end(lowrank_artifact, tmp_path, capsys):
    from libortho.cli import main

    assert main(["export", str(lowrank_artifact), str(tmp_path / "ct"), "--format", "compressed-tensors",
                 "--lora", str(tmp_path / "adapter")]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    assert (tmp_path / "ct" / "model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", str(lowrank_artifact), str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty" in err and "Traceback" not in err
