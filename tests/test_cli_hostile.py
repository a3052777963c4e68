"""Hostile and careless input to the command line: every case ends in exit code 2 and exactly one
line on stderr, never a traceback; files changed under a loaded model change nothing; alpha 0
never opens the private ortho file."""
import builtins
import json
import os
import shutil

import pytest
import torch

import libortho
from libortho import cli
from conftest import TEXT, tiny_model

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tokenizer):
    model = tiny_model("llama")
    libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=1024, seq_len=128, group_size=32),
                       progress=False)
    path = tmp_path_factory.mktemp("hostile") / "art"
    libortho.save(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def files(artifact, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "text.txt").write_text(TEXT)
    (root / "deep.jsonl").write_text(DEEP + "\n")
    (root / "deep_record.jsonl").write_text('{"id": "a", "prefix": "x", "secret": ' + DEEP + "}\n")
    (root / "folder").mkdir()
    os.mkfifo(root / "fifo")
    deep_manifest = root / "deep_manifest"
    shutil.copytree(artifact, deep_manifest)
    (deep_manifest / "libortho.json").write_text(DEEP)
    return root


def cases(a, r):
    """(name, argv, a phrase the one line must hold)."""
    text = str(r / "text.txt")
    return [
        ("manifest nested 100k deep", ["info", str(r / "deep_manifest")], "nested too deeply"),
        ("--exclude nested 100k deep", ["lookalikes", "{secret}", "--format", "digits:4", "--exclude", str(r / "deep_record.jsonl")],
         "invalid JSON record"),
        ("audit records nested 100k deep", ["audit", str(a), "--public", text, "--private", str(r / "deep_record.jsonl"),
                                             "--nonmembers", str(r / "deep_record.jsonl"), "--out", str(r / "audit")],
         "nested too deeply"),
        ("--forget nested 100k deep", ["decompose", "default", str(r / "out1"), "--calib", text, "--forget",
                                       str(r / "deep_record.jsonl"), "--public-model", "default"], "nested too deeply"),
        ("prompt not UTF-8", ["generate", str(a), "--prompt", "\udcff\udcfe"], "not UTF-8 text (bytes ff fe"),
        ("empty prompt", ["generate", str(a), "--prompt", "  "], "--prompt is empty"),
        ("perplexity window 1", ["perplexity", str(a), "--text", text, "--window", "1"], "at least 2 tokens"),
        ("max-new-tokens 10**30", ["generate", str(a), "--prompt", "hi", "--max-new-tokens", str(10**30)],
         "runs past the model's context"),
        ("max-new-tokens past a 256-token context", ["generate", str(a), "--prompt", "hi", "--max-new-tokens", "400"],
         "ask for at most 254"),
        ("seed 2**70", ["decompose", "default", str(r / "out2"), "--calib", text, "--seed", str(2**70)],
         "a seed must lie in [0, 2^63 - 1]"),
        ("integer of 5000 digits", ["decompose", "default", str(r / "out3"), "--calib", text, "--seed", "9" * 5000],
         "(5000 characters)"),
        ("text is a FIFO", ["perplexity", str(a), "--text", str(r / "fifo")], "named pipe (FIFO)"),
        ("text is /dev/null", ["perplexity", str(a), "--text", "/dev/null"], "is a device"),
        ("text is a folder", ["perplexity", str(a), "--text", str(r / "folder")], "is a folder"),
        ("alpha just above 1", ["generate", str(a), "--prompt", "hi", "--alpha", "1.00000001"], "got 1.00000001"),
        ("alpha NaN", ["generate", str(a), "--prompt", "hi", "--alpha", "nan"], "finite number"),
        ("lookalikes more than the space", ["lookalikes", "{secret}", "--format", "digits:3", "--n", "1001"],
         "fewer than 1001 secrets (1000 in all)"),
    ]


@pytest.mark.parametrize("index", range(17))
def test_hostile_input_is_one_line_and_exit_2(index, artifact, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    name, argv, phrase = cases(artifact, files)[index]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse refuses a value with SystemExit(2)
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, name
    assert "Traceback" not in "\n".join(err), name
    message = [line for line in err if not line.startswith("usage:") and line.strip()]
    message = [line for line in message if not line.startswith(" ")]  # argparse's usage continuation lines
    assert len(message) == 1 and phrase in message[0], (name, err)


def test_the_table_covers_every_case(artifact, files):
    assert len(cases(artifact, files)) == 17


def test_lookalikes_fill_a_small_space_exactly(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert cli.main(["lookalikes", "{secret}", "--format", "digits:3", "--n", "1000"]) == 0
    secrets = {json.loads(line)["secret"] for line in capsys.readouterr().out.splitlines()}
    assert len(secrets) == 1000


def test_files_changed_under_a_loaded_model_change_nothing(artifact, tmp_path, tokenizer):
    """The tensors in use come from the bytes that were hashed, not from a mapping of the files."""
    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    model, tok = libortho.load(folder, alpha=1.0)
    ids = tok(TEXT[:48], return_tensors="pt").input_ids
    before = {}
    with torch.no_grad():
        for a in (0.0, 1.0):
            libortho.set_alpha(model, a)
            before[a] = model(ids).logits
    for name in ("base.safetensors", "ortho.safetensors"):
        with open(folder / name, "r+b") as f:
            f.truncate(100)
    (folder / "tokenizer.json").write_text("{}")
    with torch.no_grad():
        for a, logits in before.items():
            libortho.set_alpha(model, a)
            assert torch.equal(model(ids).logits, logits)
    with pytest.raises(libortho.ArtifactError, match="does not match its SHA-256"):
        libortho.load(folder)


def test_alpha_zero_never_opens_an_unreadable_ortho_file(artifact, files, monkeypatch, capsys):
    """As a user who may read everything but the 0600 ortho file (emulated: tests run as root)."""
    ortho = str(artifact / "ortho.safetensors")
    real_open, real_access = builtins.open, os.access

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == ortho:
            raise PermissionError(13, "Permission denied", ortho)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != ortho and real_access(p, mode, **kw))
    monkeypatch.chdir(files)
    assert cli.main(["generate", str(artifact), "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert cli.main(["perplexity", str(artifact), "--text", "text.txt", "--max-windows", "1"]) == 0
    assert cli.main(["info", str(artifact)]) == 0
    assert "not readable by this user" in capsys.readouterr().out
    model, _ = libortho.load(artifact)  # the library too: base only, alpha fixed at 0
    with pytest.raises(ValueError, match="without its ortho stream"):
        libortho.set_alpha(model, 1.0)
    assert cli.main(["generate", str(artifact), "--prompt", "hi", "--alpha", "1"]) == 2
    assert "not readable by this user" in capsys.readouterr().err
