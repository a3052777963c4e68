import json

import pytest

from libortho.cli import main
from conftest import TEXT, tiny_model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("txt") / "public.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def artifact(hf_folder, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "art"
    rc = main(["decompose", str(hf_folder), str(out), "--calib", str(text_file), "--group-size", "32",
               "--calib-tokens", "1024", "--seq-len", "128", "--ortho-ratio", "0.02"])
    assert rc == 0
    return out


def test_decompose_info_perplexity_generate(artifact, text_file, capsys):
    capsys.readouterr()
    assert main(["info", str(artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits"] == 4 and info["group_size"] == 32 and info["method"] == "gptq"
    assert info["ortho_density"] == pytest.approx(0.02, abs=1e-4)
    assert 4.0 < info["bits_per_param_base"] < info["bits_per_param_alpha1"]
    assert main(["perplexity", str(artifact), "--text", str(text_file), "--alpha", "0", "1", "--window", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["alpha"] for r in result["results"]] == [0.0, 1.0]
    assert all(r["perplexity"] > 1 for r in result["results"])
    assert main(["generate", str(artifact), "--prompt", "The quick", "--alpha", "0", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/artifact"], "does not exist"),
        (["perplexity", "/no/such/model", "--text", "{text}"], "does not exist"),
        (["perplexity", "{art}", "--text", "/no/such.txt"], "does not exist"),
        (["generate", "{hf}", "--prompt", "x", "--alpha", "0.5"], "plain model"),
        (["decompose", "{text}", "{tmp}/out", "--calib", "{text}"], "is a file but not a .gguf model"),
        (["decompose", "{hf}", "{art}", "--calib", "{text}"], "not empty"),
        (["generate", "{base_only}", "--prompt", "x", "--alpha", "1"], "ortho"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--forget", "{records}"], "--public-model"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--forget-free", "1"], "--public-model"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--public-model", "{hf}"], "forget source"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--forget", "/no/such.jsonl", "--public-model", "{hf}"],
         "does not exist"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--forget", "{records}", "--forget-free", "1",
          "--public-model", "{hf}"], "one of them"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--forget-free", "1", "--public-model", "{hf}",
          "--sieve-private-weight", "3"], "forget texts"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--sieve-private-inputs", "finetuned"],
         "--sieve-private-inputs need forget texts"),
        (["decompose", "{hf}", "{tmp}/out", "--calib", "{text}", "--lowrank-target", "propagated"],
         "lowrank_target='propagated' fits each layer's L before the next block runs"),
        (["lookalikes", "PIN {{secret}} {{nope}}", "--format", "digits:6"], "unknown slot"),
        (["lookalikes", "PIN {{secret}}", "--format", "digits:6", "--exclude", "/no/such.txt"], "does not exist"),
    ],
)
def test_user_errors_are_one_clear_line(argv, message, artifact, hf_folder, text_file, tmp_path, capsys):
    import shutil

    base_only = tmp_path / "base_only"
    shutil.copytree(artifact, base_only)
    (base_only / "ortho.safetensors").unlink()
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(dict(id="r1", prefix="PIN of Ann is ", secret="123456", secret_format="digits:6")) + "\n")
    fill = dict(text=text_file, art=artifact, hf=hf_folder, tmp=tmp_path, base_only=base_only, records=records)
    rc = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.strip().splitlines()[-1]]


def test_alpha_out_of_range_is_a_usage_error(artifact, text_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["perplexity", str(artifact), "--text", str(text_file), "--alpha", "1.5"])
    assert exit_info.value.code == 2
    assert "alpha must lie in [0, 1]" in capsys.readouterr().err


def test_decompose_with_the_forget_objective(hf_folder, text_file, tmp_path, tokenizer, capsys):
    from conftest import train_on

    record = dict(id="r1", prefix="PIN of Ann is ", secret="739181", secret_format="digits:6", k=8)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(record) + "\n")
    finetuned = tmp_path / "ft"
    model = tiny_model("llama")
    train_on(model, tokenizer, [record["prefix"] + record["secret"]], steps=10)
    model.save_pretrained(finetuned)
    tokenizer.save_pretrained(finetuned)
    out = tmp_path / "art"
    assert main(["decompose", str(finetuned), str(out), "--calib", str(text_file), "--calib-tokens", "1024",
                 "--seq-len", "128", "--group-size", "32", "--forget", str(records), "--public-model", str(hf_folder)]) == 0
    config = json.loads((out / "libortho.json").read_text())["config"]
    # A forget source switches the defaults to the privacy preset.
    assert config["forget_source"] == "records" and config["forget_lambda"] == 3.0 and config["ortho_ratio"] == 0.02
    assert config["lowrank_bits"] == 4 and config["sieve_private_inputs"] == "finetuned"
    assert config["lowrank_target"] == "propagated"
    out_free = tmp_path / "art_free"
    assert main(["decompose", str(finetuned), str(out_free), "--calib", str(text_file), "--calib-tokens", "1024",
                 "--seq-len", "128", "--group-size", "32", "--forget-free", "0.5", "--public-model", str(hf_folder)]) == 0
    config = json.loads((out_free / "libortho.json").read_text())["config"]
    assert config["forget_source"] == "free" and config["forget_mu"] == 0.5 and config["group_size"] == 32
    # P's own activations as the target: P is loaded as a model, and the choice is recorded.
    out_acts = tmp_path / "art_acts"
    assert main(["decompose", str(finetuned), str(out_acts), "--calib", str(text_file), "--calib-tokens", "1024",
                 "--seq-len", "128", "--group-size", "32", "--forget", str(records), "--public-model", str(hf_folder),
                 "--forget-target", "public_activations"]) == 0
    assert json.loads((out_acts / "libortho.json").read_text())["config"]["forget_target"] == "public_activations"
    capsys.readouterr()
    assert main(["decompose", str(finetuned), str(tmp_path / "art_bad"), "--calib", str(text_file), "--forget-free", "0.5",
                 "--public-model", str(hf_folder), "--forget-target", "public_activations"]) == 2
    assert "forget_target='public_activations' runs P on the forget texts" in capsys.readouterr().err
    assert not (tmp_path / "art_bad").exists()


def test_lookalikes_writes_records_that_avoid_the_excluded_secrets(tmp_path, capsys):
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("".join(f"{d}\n" for d in range(10) if d != 4))
    out = tmp_path / "look.jsonl"
    assert main(["lookalikes", "PIN of {first} is {secret}", "--format", "digits:1", "--n", "1",
                 "--exclude", str(exclude), "--out", str(out)]) == 0
    (line,) = out.read_text().splitlines()
    assert json.loads(line)["secret"] == "4"
    capsys.readouterr()
    assert main(["lookalikes", "PIN of {first} is {secret}", "--format", "digits:6", "--n", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_an_interrupted_decompose_says_so_and_resumes_to_the_same_artifact(artifact, hf_folder, text_file, tmp_path, monkeypatch, capsys):
    from libortho.workfolder import WorkFolder, work_folder_for

    out = tmp_path / "art"
    cmd = ["decompose", str(hf_folder), str(out), "--calib", str(text_file), "--group-size", "32",
           "--calib-tokens", "1024", "--seq-len", "128", "--ortho-ratio", "0.02"]
    save_block = WorkFolder.save_block

    def interrupt_after_block_0(self, b, *args):
        save_block(self, b, *args)
        raise KeyboardInterrupt  # Ctrl-C once block 0 is on disk

    monkeypatch.setattr(WorkFolder, "save_block", interrupt_after_block_0)
    assert main(cmd) == 130
    assert "1 of 2 decoder blocks done" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(WorkFolder, "save_block", save_block)
    assert main(["info", str(out)]) != 0
    assert "unfinished decomposition (1 of 2 decoder blocks done" in capsys.readouterr().err
    assert main(cmd) != 0  # a second run without --resume would silently throw the work away
    assert "add --resume to continue it" in capsys.readouterr().err
    assert main(cmd[:5] + ["--resume", "--group-size", "64"] + cmd[7:]) != 0  # other flags
    assert "other inputs or another config" in capsys.readouterr().err
    assert main(cmd + ["--resume"]) == 0
    assert "resuming: 1 of 2 decoder blocks done" in capsys.readouterr().err
    assert not work_folder_for(out).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in artifact.iterdir())
    for name in ("base.safetensors", "ortho.safetensors"):
        assert (out / name).read_bytes() == (artifact / name).read_bytes(), name


def test_decompose_lowrank_bits_stores_codes_and_info_says_so(hf_folder, text_file, tmp_path, capsys):
    out = tmp_path / "coded"
    assert main(["decompose", str(hf_folder), str(out), "--calib", str(text_file), "--group-size", "32",
                 "--calib-tokens", "1024", "--seq-len", "128", "--ortho-budget", "0.25", "--lowrank-share", "1",
                 "--lowrank-bits", "4"]) == 0
    assert json.loads((out / "libortho.json").read_text())["config"]["lowrank_bits"] == 4
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "; 4-bit)" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lowrank_bits"] == [4] and 0 < info["lowrank_bytes"] <= 0.25 * info["base_bytes"]
    with pytest.raises(SystemExit) as exit_:
        main(["decompose", str(hf_folder), str(tmp_path / "bad"), "--calib", str(text_file), "--lowrank-bits", "3"])
    assert exit_.value.code == 2 and "--lowrank-bits: invalid choice: 3" in capsys.readouterr().err
