import json
import shutil

import pytest
import torch

import libortho
from libortho import artifact as artifact_module
from libortho.artifact_format import FORMAT_VERSION, ArtifactError
from conftest import TEXT, tiny_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer):
    model = tiny_model("llama")
    libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32), progress=False)
    path = tmp_path_factory.mktemp("art") / "a"
    libortho.save(model, tokenizer, path)
    return model, path


def test_save_load_forward_bit_identical(artifact, tokenizer):
    model, path = artifact
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    loaded, _ = libortho.load(path, alpha=1.0)
    for a in (0.0, 0.3, 1.0):
        with libortho.alpha(model, a), libortho.alpha(loaded, a), torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)
    manifest = json.loads((path / "libortho.json").read_text())
    assert manifest["files"]["base.safetensors"] == manifest["ortho"]["base_sha256"]
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in path.iterdir())


def test_load_builds_no_weight_it_then_replaces(artifact, monkeypatch):
    """The model is built on the meta device: no random initialisation runs, every tensor ends up real,
    and what the files do not store (rotary frequencies, the empty ortho buffers at alpha 0) is as built."""
    import torch.nn.init as init

    model, path = artifact

    def only_on_meta(real):
        def init_(tensor, *args, **kwargs):
            assert tensor.is_meta, "load initialised a real weight randomly"
            return real(tensor, *args, **kwargs)
        return init_

    for name in ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_"):
        monkeypatch.setattr(init, name, only_on_meta(getattr(init, name)))
    loaded, _ = libortho.load(path, with_ortho=False)
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [n for n, t in tensors.items() if t.is_meta]
    built = dict(model.named_buffers())
    assert any(n.endswith("inv_freq") for n in tensors)
    for name, t in tensors.items():
        if name.endswith("inv_freq"):
            assert torch.equal(t, built[name])
        if name.endswith(("ortho_crow", "ortho_col", "ortho_val", "ortho_A", "ortho_B")):
            assert not t.any()


def test_load_save_load_keeps_the_manifest_and_the_bytes(artifact, tmp_path):
    """load -> save keeps every field of the manifest but the per-file hashes (config, layer
    table, provenance, stats), and at the stored dtypes on the CPU every tensor file byte for byte."""
    from libortho.artifact_format import decomposition_fields

    _, path = artifact
    first = json.loads((path / "libortho.json").read_text())
    assert first["config"]["group_size"] == 32 and first["stats"]["n_layers"] > 0
    assert first["provenance"]["libortho_version"] == libortho.__version__
    model, tok = libortho.load(path)
    libortho.save(model, tok, tmp_path / "b")
    second = json.loads((tmp_path / "b" / "libortho.json").read_text())
    assert decomposition_fields(second) == decomposition_fields(first)
    for name in ("base.safetensors", "ortho.safetensors"):
        assert (tmp_path / "b" / name).read_bytes() == (path / name).read_bytes(), name
    model, tok = libortho.load(tmp_path / "b")
    libortho.save(model, tok, tmp_path / "c")
    assert decomposition_fields(json.loads((tmp_path / "c" / "libortho.json").read_text())) == decomposition_fields(first)


def test_a_model_loaded_without_ortho_saves_a_base_only_artifact(artifact, tmp_path):
    _, path = artifact
    model, tok = libortho.load(path, with_ortho=False)
    libortho.save(model, tok, tmp_path / "base_only")
    manifest = json.loads((tmp_path / "base_only" / "libortho.json").read_text())
    assert manifest["ortho"] is None and "ortho.safetensors" not in manifest["files"]
    assert not (tmp_path / "base_only" / "ortho.safetensors").exists()
    assert (tmp_path / "base_only" / "base.safetensors").read_bytes() == (path / "base.safetensors").read_bytes()
    assert manifest["config"] == json.loads((path / "libortho.json").read_text())["config"]
    with pytest.raises(ArtifactError, match="base-only artifact"):
        libortho.load(tmp_path / "base_only", alpha=1.0)
    loaded, _ = libortho.load(tmp_path / "base_only")
    with pytest.raises(ValueError, match="without its ortho stream"):
        libortho.set_alpha(loaded, 0.5)


def test_a_format_1_artifact_still_loads(artifact, tmp_path):
    """Artifacts written before the format had a version 2 (top-level ortho_base_sha256, free extra keys)."""
    import shutil

    model, path = artifact
    old = tmp_path / "v1"
    shutil.copytree(path, old)
    m = json.loads((old / "libortho.json").read_text())
    v1 = dict(format_version=1, config=m["config"], layers=m["layers"], files=m["files"],
              ortho_base_sha256=m["ortho"]["base_sha256"], stats=m["stats"], source="default")
    (old / "libortho.json").write_text(json.dumps(v1))
    loaded, tok = libortho.load(old, alpha=1.0)
    ids = tok(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(model, 1.0), torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    libortho.save(loaded, tok, tmp_path / "v2")
    upgraded = json.loads((tmp_path / "v2" / "libortho.json").read_text())
    assert upgraded["format_version"] == FORMAT_VERSION and upgraded["provenance"] == {"source": "default"}
    assert all(spec["ortho_rank"] == 0 for spec in upgraded["layers"].values())
    assert upgraded["config"] == m["config"] and upgraded["stats"] == m["stats"]


def test_load_without_ortho_fixes_alpha_at_zero(artifact, tmp_path, tokenizer):
    model, path = artifact
    base_only = tmp_path / "base_only"
    shutil.copytree(path, base_only)
    (base_only / "ortho.safetensors").unlink()
    with pytest.raises(ArtifactError, match="ortho"):
        libortho.load(base_only, alpha=1.0)
    loaded, _ = libortho.load(base_only, alpha=0.0)
    with pytest.raises(ValueError, match="fixed at 0"):
        libortho.set_alpha(loaded, 0.5)
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(model, 0.0), torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_ortho_from_another_base_is_refused(artifact, tmp_path, tokenizer):
    _, path = artifact
    other_model = tiny_model("llama", seed=1)
    libortho.decompose(other_model, tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32), progress=False)
    other = libortho.save(other_model, tokenizer, tmp_path / "other")
    mixed = tmp_path / "mixed"
    shutil.copytree(path, mixed)
    shutil.copy(other / "ortho.safetensors", mixed / "ortho.safetensors")
    with pytest.raises(ArtifactError, match="ortho.safetensors does not match its SHA-256"):
        libortho.load(mixed)
    with pytest.raises(ArtifactError, match="different base"):
        libortho.load(mixed, verify=False)


def _rewrite_ortho(folder, edit, rehash: bool = False) -> None:
    """Rewrite folder's ortho.safetensors with edit(tensors) applied, its header metadata kept; with
    `rehash`, the manifest's hash made to agree (so that the checks behind the hash are what refuse)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from libortho.artifact_check import sha256_file

    with safe_open(str(folder / "ortho.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(folder / "ortho.safetensors"), metadata=meta)
    if rehash:
        m = json.loads((folder / "libortho.json").read_text())
        m["files"]["ortho.safetensors"] = sha256_file(folder / "ortho.safetensors")
        (folder / "libortho.json").write_text(json.dumps(m))


def _scale(tensors, suffix: str, factor: float) -> None:
    for k in tensors:
        if k.endswith(suffix):
            tensors[k] = tensors[k] * factor


def test_ortho_from_another_decomposition_of_the_same_base_is_refused(artifact, tmp_path):
    """Same base, same CSR support, other values (e.g. another sieve or refit): only the hash tells."""
    _, path = artifact
    mixed = tmp_path / "mixed"
    shutil.copytree(path, mixed)
    _rewrite_ortho(mixed, lambda t: _scale(t, "ortho_val", 2))
    with pytest.raises(ArtifactError, match="ortho.safetensors does not match its SHA-256"):
        libortho.load(mixed, alpha=1.0)
    libortho.load(mixed, alpha=1.0, verify=False)  # structurally valid: the hash is what refuses it


def test_truncated_file_is_refused_clearly(artifact, tmp_path):
    _, path = artifact
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    data = (broken / "base.safetensors").read_bytes()
    (broken / "base.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt, truncated"):
        libortho.load(broken)
    with pytest.raises(ArtifactError, match="cannot be read as safetensors"):
        libortho.load(broken, verify=False)


def test_corrupt_manifest_and_missing_paths(artifact, tmp_path):
    _, path = artifact
    with pytest.raises(ArtifactError, match="does not exist"):
        libortho.load(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="empty folder"):
        libortho.load(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ArtifactError, match="libortho.json is missing"):
        libortho.load(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "libortho.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        libortho.load(bad)


def test_save_never_overwrites_foreign_data(artifact, tmp_path, tokenizer):
    model, _ = artifact
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not empty"):
        libortho.save(model, tokenizer, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert not any(p.name.startswith(".precious.tmp") for p in tmp_path.iterdir())


def test_default_device_reads_the_environment(monkeypatch):
    from libortho.artifact_format import ArtifactError
    from libortho.sources import default_device

    monkeypatch.delenv("LIBORTHO_DEVICE", raising=False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setenv("LIBORTHO_DEVICE", "not-a-device")
    with pytest.raises(ArtifactError, match="LIBORTHO_DEVICE='not-a-device' is not a device name"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("LIBORTHO_DEVICE", "cuda")
        with pytest.raises(ArtifactError, match="sees no CUDA device"):
            default_device()


def _with_low_rank(model, rank: int = 4, seed: int = 0):
    """Give every layer of a decomposed model a random low-rank part (the format's test, not a fit)."""
    from libortho.layer import OrthoLinear, ortho_layers
    from libortho.hf_model import replace_submodule

    g = torch.Generator().manual_seed(seed)
    names = {m: n for n, m in model.named_modules() if isinstance(m, OrthoLinear)}
    for layer in ortho_layers(model):
        new = OrthoLinear(layer.in_features, layer.out_features, layer.bits, layer.group_size, layer.symmetric,
                          bias=layer.bias is not None, ortho_nnz=layer.ortho_nnz, ortho_dtype=layer.ortho_val.dtype,
                          ortho_rank=rank)
        state = layer.state_dict()
        state["ortho_B"] = (torch.randn(layer.out_features, rank, generator=g) * 0.02).half()
        state["ortho_A"] = (torch.randn(rank, layer.in_features, generator=g) * 0.02).half()
        new.load_state_dict(state)
        new.alpha_state = layer.alpha_state
        replace_submodule(model, names[layer], new)


def test_the_low_rank_part_round_trips_lives_in_the_ortho_file_and_is_checked(tokenizer, tmp_path):
    from safetensors import safe_open

    model = tiny_model("llama")
    libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32),
                       progress=False)
    _with_low_rank(model)
    path = libortho.save(model, tokenizer, tmp_path / "lr")
    manifest = json.loads((path / "libortho.json").read_text())
    assert all(spec["ortho_rank"] == 4 for spec in manifest["layers"].values())
    with safe_open(str(path / "base.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith(("ortho_A", "ortho_B"))]
    with safe_open(str(path / "ortho.safetensors"), "pt") as f:
        assert sum(k.endswith(("ortho_A", "ortho_B")) for k in f.keys()) == 2 * len(manifest["layers"])
    loaded, _ = libortho.load(path, alpha=1.0)
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    for a in (0.0, 0.5, 1.0):
        with libortho.alpha(model, a), libortho.alpha(loaded, a), torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits), a
    base_only, _ = libortho.load(path, with_ortho=False)  # alpha 0 needs neither part
    with libortho.alpha(model, 0.0), torch.no_grad():
        assert torch.equal(model(ids).logits, base_only(ids).logits)

    tampered = tmp_path / "tampered"
    shutil.copytree(path, tampered)
    first = next(n for n in manifest["layers"]) + ".ortho_A"

    def nudge(t):
        t[first][0, 0] += 1

    _rewrite_ortho(tampered, nudge)
    with pytest.raises(ArtifactError, match="ortho.safetensors does not match its SHA-256"):
        libortho.load(tampered, alpha=1.0)
    # a rank the manifest does not say, with the hashes made to agree
    _rewrite_ortho(tampered, lambda t: t.update({first: t[first][:2]}), rehash=True)
    with pytest.raises(ArtifactError, match="ortho_A is \\(2, .*ortho_rank 4"):
        libortho.load(tampered, alpha=1.0)


def test_a_coded_low_rank_part_round_trips_lives_in_the_ortho_file_and_is_checked(tokenizer, tmp_path):
    from safetensors import safe_open

    from libortho.artifact_format import LOWRANK_CODE_KEYS

    model = tiny_model("llama")
    config = libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32, ortho_budget=0.25, lowrank_share=1.0,
                                  lowrank_bits=4)
    libortho.decompose(model, tokenizer, TEXT, config, progress=False)
    path = libortho.save(model, tokenizer, tmp_path / "coded")
    manifest = json.loads((path / "libortho.json").read_text())
    assert manifest["format_version"] == 4
    assert all(spec["lowrank_bits"] == 4 and spec["ortho_rank"] > 0 for spec in manifest["layers"].values())
    with safe_open(str(path / "base.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.rsplit(".", 1)[-1] in LOWRANK_CODE_KEYS + ("ortho_A", "ortho_B")]
    with safe_open(str(path / "ortho.safetensors"), "pt") as f:
        assert sum(k.rsplit(".", 1)[-1] in LOWRANK_CODE_KEYS for k in f.keys()) == 6 * len(manifest["layers"])
    loaded, _ = libortho.load(path, alpha=1.0)
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    for a in (0.0, 0.5, 1.0):
        with libortho.alpha(model, a), libortho.alpha(loaded, a), torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits), a

    first = next(n for n in manifest["layers"]) + ".ortho_Aq_scales"
    _rewrite_ortho(path, lambda t: t.update({first: t[first][:1]}), rehash=True)
    with pytest.raises(ArtifactError, match=r"ortho_Aq_scales is torch.float16 \(1, .*lowrank_bits 4"):
        libortho.load(path, alpha=1.0)


def test_a_format_3_manifest_reads_as_float_low_rank(artifact, tmp_path):
    model, path = artifact
    old = tmp_path / "v3"
    shutil.copytree(path, old)
    m = json.loads((old / "libortho.json").read_text())
    m["format_version"] = 3
    for spec in m["layers"].values():
        del spec["lowrank_bits"]
    (old / "libortho.json").write_text(json.dumps(m))
    loaded, tok = libortho.load(old, alpha=1.0)
    ids = tok(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(model, 1.0), torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert artifact_module.read_manifest(old)["layers"] == {n: {**s, "lowrank_bits": 16} for n, s in m["layers"].items()}
