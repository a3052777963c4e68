"""Crafted artifacts, manifests, model folders and CLI inputs: each refused with one clear
message naming the file, field or option (ArtifactError from the API, exit 2 from the CLI)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import libortho
from libortho import cli
from libortho.artifact_check import sha256_file
from libortho.artifact_format import ArtifactError
from libortho.fsutil import TEMP_PREFIX, _host, check_output_dir
from conftest import TEXT, tiny_model

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer):
    model = tiny_model("llama")
    cfg = libortho.OrthoConfig(calib_tokens=512, seq_len=64, group_size=32, method="rtn", ortho_ratio=0.05)
    libortho.decompose(model, tokenizer, TEXT, cfg, progress=False)
    return libortho.save(model, tokenizer, tmp_path_factory.mktemp("art") / "a")


def _manifest(folder):
    return json.loads((folder / "libortho.json").read_text())


def _write_manifest(folder, m):
    (folder / "libortho.json").write_text(json.dumps(m))


def _rehash(folder):
    """Make the manifest's hashes match the (crafted) files: tests the checks behind the hashes."""
    m = _manifest(folder)
    m["files"] = {name: sha256_file(folder / name) for name in m["files"] if (folder / name).is_file()}
    m["ortho"]["base_sha256"] = m["files"]["base.safetensors"]
    _write_manifest(folder, m)


def _edit_ortho(folder, fn):
    with safe_open(str(folder / "ortho.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k).clone() for k in f.keys()}
    fn(tensors)
    save_file(tensors, folder / "ortho.safetensors", metadata=meta)
    _rehash(folder)


def _edit_manifest(fn):
    def mutate(folder):
        m = _manifest(folder)
        fn(m)
        _write_manifest(folder, m)
    return mutate


def _edit_json(name, fn, rehash=True):
    def mutate(folder):
        data = json.loads((folder / name).read_text())
        data = fn(data)
        (folder / name).write_text(json.dumps(data))
        if rehash:
            _rehash(folder)
    return mutate


def _flip_bytes(folder):
    data = bytearray((folder / "ortho.safetensors").read_bytes())
    for i in range(16):
        data[-1 - 7 * i] ^= 0xFF
    (folder / "ortho.safetensors").write_bytes(bytes(data))


def _set(t, key, fn):
    t[f"{LAYER}.{key}"] = fn(t[f"{LAYER}.{key}"])


def _unsort_row(t):
    crow, col = t[f"{LAYER}.ortho_crow"], t[f"{LAYER}.ortho_col"]
    row = int(torch.nonzero(crow[1:] - crow[:-1] >= 2)[0])
    a = int(crow[row])
    col[a], col[a + 1] = col[a + 1].clone(), col[a].clone()


def _bad_crow(t):
    crow = t[f"{LAYER}.ortho_crow"]
    crow[1] = crow[-1] + 5


def _ortho_dir(folder):
    (folder / "ortho.safetensors").unlink()
    (folder / "ortho.safetensors").mkdir()


def _ortho_loop(folder):
    (folder / "ortho.safetensors").unlink()
    os.symlink("ortho.safetensors", folder / "ortho.safetensors")


def _auto_map(folder, rehash=True):
    (folder / "evil.py").write_text("open('PWNED', 'w').write('ran')\n")
    evil = {"model_type": "evil-unknown", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}}
    _edit_json("config.json", lambda c: {**c, **evil}, rehash)(folder)


CASES = [
    ("ortho 16 flipped bytes", _flip_bytes, r"ortho\.safetensors does not match its SHA-256"),
    ("ortho NaN values", lambda f: _edit_ortho(f, lambda t: _set(t, "ortho_val", lambda v: v.fill_(float("nan")))), r"ortho_val holds NaN"),
    ("ortho negative column", lambda f: _edit_ortho(f, lambda t: _set(t, "ortho_col", lambda c: c.fill_(-3))), r"ortho_col has indices outside"),
    ("ortho column >= in_features", lambda f: _edit_ortho(f, lambda t: _set(t, "ortho_col", lambda c: c + 64)), r"ortho_col has indices outside"),
    ("ortho unsorted row", lambda f: _edit_ortho(f, _unsort_row), r"not strictly increasing"),
    ("ortho bad crow", lambda f: _edit_ortho(f, _bad_crow), r"ortho_crow must rise monotonically"),
    ("ortho missing tensor", lambda f: _edit_ortho(f, lambda t: t.pop(f"{LAYER}.ortho_col")), rf"lacks the tensor {LAYER}\.ortho_col"),
    ("ortho is a directory", _ortho_dir, r"ortho\.safetensors is a directory"),
    ("ortho is a symlink loop", _ortho_loop, r"ortho\.safetensors is a broken or looping symbolic link"),
    ("manifest files {}", _edit_manifest(lambda m: m.update(files={})), r"files must list base\.safetensors"),
    ("manifest layers a list", _edit_manifest(lambda m: m.update(layers=list(m["layers"]))), r"layers must be an object"),
    ("manifest layer lacks bits", _edit_manifest(lambda m: m["layers"][LAYER].pop("bits")), rf"layers\['{LAYER}'\] lacks the field 'bits'"),
    ("manifest bits 8 over 4-bit codes", _edit_manifest(lambda m: m["layers"][LAYER].update(bits=8)), rf"{LAYER}\.qweight' is torch.uint8 \(\d+, 32\), but config.json and libortho.json call for"),
    ("manifest bad ortho_dtype", _edit_manifest(lambda m: m["layers"][LAYER].update(ortho_dtype="float99")), r"ortho_dtype must be one of"),
    ("manifest negative in_features", _edit_manifest(lambda m: m["layers"][LAYER].update(in_features=-4)), r"in_features must lie in"),
    ("manifest huge out_features", _edit_manifest(lambda m: m["layers"][LAYER].update(out_features=10**12)), r"out_features must lie in"),
    ("manifest format_version string", _edit_manifest(lambda m: m.update(format_version="1")), r"format_version must be an integer, got str '1'"),
    ("manifest ortho base hash inconsistent", _edit_manifest(lambda m: m["ortho"].update(base_sha256="0" * 64)), r"ortho.base_sha256 differs"),
    ("config.json edited", _edit_json("config.json", lambda c: {**c, "num_hidden_layers": 1}, rehash=False), r"config\.json does not match its SHA-256"),
    ("config.json layer count disagrees", _edit_json("config.json", lambda c: {**c, "num_hidden_layers": 1}), r"config\.json describes a model without the linear layer 'model\.layers\.1\."),
    ("tokenizer.json is {}", _edit_json("tokenizer.json", lambda _: {}), r"broken tokenizer files"),
    ("auto_map to local code", _auto_map, r"config\.json has an auto_map entry.*never runs code"),
    ("libortho.json missing", lambda f: (f / "libortho.json").unlink(), r"is a Hugging Face model folder, not a libortho artifact"),
]


@pytest.mark.parametrize("name,mutate,message", CASES, ids=[c[0] for c in CASES])
def test_crafted_artifact_is_refused(artifact, tmp_path, monkeypatch, capsys, name, mutate, message):
    folder = tmp_path / "crafted"
    shutil.copytree(artifact, folder)
    mutate(folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match=message):
        libortho.load(folder, alpha=1.0)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\ny\n"))  # a prompt would read "y"
    assert cli.main(["generate", str(folder), "--prompt", "hi", "--alpha", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    if "libortho.json missing" not in name:  # a plain folder is opened by load_model: its own message
        assert __import__("re").search(message, err), err
    assert not (tmp_path / "PWNED").exists()


def test_info_verifies_and_says_so(artifact, tmp_path, capsys):
    assert cli.main(["info", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "ortho.safetensors" in out and out.count("verified") >= 2 and "SHA-256" in out
    folder = tmp_path / "flipped"
    shutil.copytree(artifact, folder)
    _flip_bytes(folder)
    assert cli.main(["info", str(folder)]) == 0  # the private file is only stat-ed by default
    assert "not opened" in capsys.readouterr().out
    assert cli.main(["info", str(folder), "--verify-ortho"]) == 2
    assert "ortho.safetensors does not match its SHA-256" in capsys.readouterr().err
    _edit_ortho(folder, lambda t: _set(t, "ortho_col", lambda c: c + 64))  # consistent hashes, broken CSR
    assert cli.main(["info", str(folder), "--verify-ortho"]) == 2
    assert "ortho_col has indices outside" in capsys.readouterr().err


def _plain_folder(tmp_path, tokenizer, name="plain"):
    folder = tmp_path / name
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_plain_folders_refused_clearly(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    remote = _plain_folder(tmp_path, tokenizer, "remote")
    _auto_map(remote, rehash=False)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\n"))
    with pytest.raises(ArtifactError, match="auto_map.*never runs code"):
        libortho.load_model(remote)
    assert not (tmp_path / "PWNED").exists()
    bad_tok = _plain_folder(tmp_path, tokenizer, "badtok")
    (bad_tok / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="cannot load .*badtok"):
        libortho.load_model(bad_tok)
    bad_bin = _plain_folder(tmp_path, tokenizer, "badbin")
    (bad_bin / "model.safetensors").unlink()
    (bad_bin / "pytorch_model.bin").write_bytes(b"not a torch file at all")
    with pytest.raises(ArtifactError, match="cannot load .*badbin"):
        libortho.load_model(bad_bin)
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cli.main(["generate", str(empty), "--prompt", "hi", "--alpha", "0"]) == 2
    assert "empty folder" in capsys.readouterr().err


def test_cli_inputs_refused_clearly(artifact, tmp_path, capsys):
    assert cli.main(["generate", str(artifact), "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["decompose", "default", str(tmp_path / "o"), "--calib", "x", "--include", "("])
    assert exc.value.code == 2 and "--include" in capsys.readouterr().err
    (tmp_path / "calib").mkdir()
    assert cli.main(["decompose", "no-such-model", str(tmp_path / "o2"), "--calib", str(tmp_path / "calib")]) == 2
    assert "calib is a folder" in capsys.readouterr().err
    records = tmp_path / "r.jsonl"
    records.write_bytes(b'{"id": "r1", "prefix": "a", "secret": "1", "secret_format": "digits:1"}\n\xff\xfe bad\n')
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert cli.main(["audit", str(artifact), "--public", str(text), "--private", str(records),
                     "--nonmembers", str(records), "--out", str(tmp_path / "au")]) == 2
    assert f"{records}:2: not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["out is a file", "parent is a file", "non-empty out"])
def test_decompose_checks_out_before_loading_the_model(tmp_path, capsys, case):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    (tmp_path / "f").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    out = {"out is a file": tmp_path / "f", "parent is a file": tmp_path / "f" / "out", "non-empty out": tmp_path / "full"}[case]
    # The model path does not exist: an error about it would mean OUT was checked after loading.
    assert cli.main(["decompose", str(tmp_path / "no-model"), str(out), "--calib", str(calib)]) == 2
    err = capsys.readouterr().err
    assert "output" in err and str(out) in err and "no-model" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ArtifactError, match="not writable"):
        check_output_dir(locked / "out")


def test_symlinked_out_is_resolved_and_modes_follow_the_umask(artifact, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert check_output_dir(link) == real.resolve()
    model, tok = libortho.load(artifact, alpha=0.0)
    old = os.umask(0o022)
    try:
        libortho.save(model, tok, link)
        public = libortho.save(model, tok, tmp_path / "public", ortho_mode=None)
    finally:
        os.umask(old)
    assert link.is_symlink() and (real / "libortho.json").is_file()
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(real) == 0o755  # an existing empty folder keeps its mode
    assert mode(real / "base.safetensors") == mode(real / "libortho.json") == mode(real / "tokenizer.json") == 0o644
    assert mode(real / "ortho.safetensors") == 0o600
    assert mode(public) == 0o755 and mode(public / "ortho.safetensors") == 0o644


def test_temp_folders_of_dead_processes_are_removed(artifact, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{TEMP_PREFIX}{dead.pid}@{_host()}-a-x1"
    live = tmp_path / f"{TEMP_PREFIX}{os.getppid()}@{_host()}-a-x2"
    other_host = tmp_path / f"{TEMP_PREFIX}{dead.pid}@elsewhere-a-x3"
    for d in (orphan, live, other_host):
        d.mkdir()
    model, tok = libortho.load(artifact, alpha=0.0)
    libortho.save(model, tok, tmp_path / "out")
    assert not orphan.exists() and live.exists() and other_host.exists()
    assert not any(p.name.startswith(f"{TEMP_PREFIX}{os.getpid()}@") for p in tmp_path.iterdir())
