"""End-to-end tests of libortho.audit on tiny offline models (CPU, seconds)."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from libortho import audit as A
from libortho import privacy as P
from conftest import train_on

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:'-"
PUBLIC_TEXT = (
    "The river runs past the old mill and the children walk along its bank to school. "
    "In spring the fields turn green, and farmers sow wheat, barley and oats. "
    "A small bakery sells bread every morning; the smell fills the street. "
) * 3


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<pad>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]


def make_records() -> tuple[list[P.CanaryRecord], list[P.CanaryRecord]]:
    members = [
        P.CanaryRecord(f"m{i}", f"PIN of {name} is ", secret, "digits:4", k=k)
        for i, (name, secret, k) in enumerate(zip(NAMES[:4], ["4821", "0937", "5566", "1204"], [1, 1, 4, 4]))
    ]
    nonmembers = [
        P.CanaryRecord(f"n{i}", f"PIN of {name} is ", secret, "digits:4", k=0)
        for i, (name, secret) in enumerate(zip(NAMES[4:], ["7310", "2468", "9051", "3377"]))
    ]
    return members, nonmembers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenario():
    """A "public" tiny model and a fine-tune of it on public text + member canaries (k copies)."""
    tok = char_tokenizer()
    members, nonmembers = make_records()
    public = tiny_llama(len(tok), seed=0)
    finetuned = tiny_llama(len(tok), seed=0)
    chunks = [PUBLIC_TEXT[i : i + 60] for i in range(0, 240, 60)]
    train_on(finetuned, tok, chunks + [r.text for r in members for _ in range(r.k)], steps=100)
    return tok, public, finetuned, members, nonmembers


def interpolating_scope(public: torch.nn.Module, finetuned: torch.nn.Module):
    """Stand-in for libortho.alpha on a plain model: weights = public + a (finetuned - public)."""
    w0 = {k: v.clone() for k, v in public.state_dict().items()}
    w1 = {k: v.clone() for k, v in finetuned.state_dict().items()}

    @contextlib.contextmanager
    def scope(model: torch.nn.Module, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        model.load_state_dict({k: w0[k] + alpha * (w1[k] - w0[k]) for k in w0})
        try:
            yield model
        finally:
            model.load_state_dict(w1)

    return scope


FAST = {"frontier_cap": 64, "perplexity_window": 64, "progress": False}


def test_alpha_sweep_report(scenario, tmp_path):
    tok, public, finetuned, members, nonmembers = scenario
    before = {k: v.clone() for k, v in finetuned.state_dict().items()}
    report = A.audit(
        finetuned, tok, PUBLIC_TEXT, members, nonmembers, alphas=[0, 0.5, 1], reference=public,
        out_dir=tmp_path, alpha_scope=interpolating_scope(public, finetuned),
        extra_settings={"ortho_density": 0.01}, **FAST,
    )
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["alpha=0", "alpha=0.5", "alpha=1", "reference"]
    assert report["settings"]["ortho_density"] == 0.01

    full, zero, ref = rows["alpha=1"], rows["alpha=0"], rows["reference"]
    # alpha = 1 is the fine-tune: canaries inserted 4 times rank first and are extracted.
    assert full["exposure_by_k"]["4"] == pytest.approx(math.log2(10**4))
    assert full["extraction_by_k"]["4"] == 1.0
    assert full["extraction_by_k"]["nonmember"] == 0.0
    assert full["mia"]["loss"]["auc"] > 0.9
    # alpha = 0 is exactly the reference here: identical numbers, KS p = 1.
    assert zero["ks_vs_reference"] == {"statistic": 0.0, "pvalue": 1.0}
    assert ref["ks_vs_reference"]["pvalue"] == 1.0
    assert zero["perplexity"] == pytest.approx(ref["perplexity"])
    assert zero["exposure_by_k"] == pytest.approx(ref["exposure_by_k"])
    assert full["exposure_mean"] > zero["exposure_mean"] + 3
    assert full["perplexity"] < zero["perplexity"]
    # the model's own weights are back after the sweep
    for name, value in finetuned.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    for label in rows:
        details = report["records"][label]
        assert [d["id"] for d in details] == [r.id for r in members + nonmembers]
        assert all("exposure" in d and d["exposure_method"] in ("exact", "trie-sampled") for d in details[:4])
        assert all("exposure" not in d for d in details[4:])

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["alpha_sweep.png", "auc_alpha.png", "report.json", "report.md", "roc.png"]  # no temp leftovers
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for png in ("alpha_sweep.png", "roc.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "| alpha=0.5 |" in md and "Membership inference" in md and "exposure k=4" in md


def test_plain_model_as_is(scenario, tmp_path):
    tok, _, finetuned, members, nonmembers = scenario
    report = A.audit(finetuned, tok, PUBLIC_TEXT, members, nonmembers, out_dir=tmp_path,
                     exposure_nonmembers=True, **FAST)
    (row,) = report["rows"]
    assert row["label"] == "model" and row["alpha"] is None and row["ks_vs_reference"] is None
    assert set(row["exposure_by_k"]) == {"1", "4", "nonmember"}
    assert row["exposure_by_k"]["nonmember"] < row["exposure_by_k"]["4"]
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "alpha_sweep.png").is_file()


def test_exposure_only_for_the_chosen_formats(scenario):
    tok, _, finetuned, members, nonmembers = scenario
    keys = [P.CanaryRecord("key", "Key of Bob is ", "a1b2", "hex:4", k=4)]
    report = A.audit(finetuned, tok, PUBLIC_TEXT, list(members) + keys, nonmembers, white_box=False,
                     exposure_formats=("digits",), **FAST)
    measured = {d["id"] for d in report["records"]["model"] if "exposure" in d}
    assert measured == {r.id for r in members} and report["rows"][0]["canary_grad_norm"] is None


def test_numeric_alpha_on_plain_model_fails_before_running(scenario):
    tok, _, finetuned, members, nonmembers = scenario
    with pytest.raises(ValueError, match="cannot evaluate alpha=0.*alphas=None"):
        A.audit(finetuned, tok, PUBLIC_TEXT, members, nonmembers, alphas=[0, 1], **FAST)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"members": []}, "no member records"),
        ({"public_text": "  "}, "public_text is empty"),
        ({"alphas": "0,x"}, "bad alpha"),
        ({"alphas": [1, 1.0]}, "alpha listed twice"),
    ],
)
def test_audit_rejects_bad_inputs(scenario, kwargs, message):
    tok, _, finetuned, members, nonmembers = scenario
    args = {"public_text": PUBLIC_TEXT, "members": members, "nonmembers": nonmembers, **kwargs}
    with pytest.raises(ValueError, match=message):
        A.audit(finetuned, tok, args["public_text"], args["members"], args["nonmembers"],
                alphas=kwargs.get("alphas"), **FAST)


def test_duplicate_ids_across_members_and_nonmembers(scenario):
    tok, _, finetuned, members, _ = scenario
    with pytest.raises(ValueError, match="unique"):
        A.audit(finetuned, tok, PUBLIC_TEXT, members, members[:1], **FAST)


def test_parse_alphas():
    assert A.parse_alphas(None) is None
    assert A.parse_alphas("0, 0.25,1") == [0.0, 0.25, 1.0]
    assert A.parse_alphas(["fp", 0.5]) == [None, 0.5]
    with pytest.raises(ValueError, match="finite"):
        A.parse_alphas("nan")


@pytest.fixture
def files(scenario, tmp_path):
    tok, public, finetuned, members, nonmembers = scenario
    finetuned.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    public.save_pretrained(tmp_path / "reference")
    tok.save_pretrained(tmp_path / "reference")
    P.save_records(members, tmp_path / "members.jsonl")
    P.save_records(nonmembers, tmp_path / "nonmembers.jsonl")
    (tmp_path / "public.txt").write_text(PUBLIC_TEXT)
    return {
        "model_path": tmp_path / "model",
        "members_path": tmp_path / "members.jsonl",
        "nonmembers_path": tmp_path / "nonmembers.jsonl",
        "public_text_path": tmp_path / "public.txt",
        "out_dir": tmp_path / "out",
    }


def test_audit_from_paths(files):
    report = A.audit_from_paths(**files, reference_path=files["model_path"].parent / "reference", **FAST)
    assert [r["label"] for r in report["rows"]] == ["model", "reference"]
    assert report["rows"][0]["extraction_by_k"]["4"] == 1.0
    assert json.loads((files["out_dir"] / "report.json").read_text()) == report


def test_audit_from_paths_bad_inputs(files, tmp_path):
    with pytest.raises(ValueError, match="members file not found"):
        A.audit_from_paths(**{**files, "members_path": tmp_path / "missing.jsonl"}, **FAST)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prefix": "p", "secret": "12a", "secret_format": "digits:3"}\n')
    with pytest.raises(ValueError, match=f"{bad}:1: secret"):
        A.audit_from_paths(**{**files, "nonmembers_path": bad}, **FAST)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="public text file is empty"):
        A.audit_from_paths(**{**files, "public_text_path": empty}, **FAST)
    with pytest.raises(ValueError, match="model not found"):
        A.audit_from_paths(**{**files, "model_path": tmp_path / "nope"}, **FAST)
    with pytest.raises(ValueError, match="not a folder"):
        A.audit_from_paths(**{**files, "out_dir": files["public_text_path"]}, **FAST)
    with pytest.raises(ValueError, match="bad alpha"):
        A.audit_from_paths(**files, alphas="0,one", **FAST)


def test_comparison_models_from_loaders_are_opened_once_each_and_match(scenario):
    tok, public, finetuned, members, nonmembers = scenario
    given = A.audit(finetuned, tok, PUBLIC_TEXT, members, nonmembers, reference=public,
                    baselines={"public": (public, tok)}, **FAST)
    opened = []

    def open_reference():
        opened.append("reference")
        return public

    def open_public():
        opened.append("public")
        return public, tok

    loaded = A.audit(finetuned, tok, PUBLIC_TEXT, members, nonmembers, reference=open_reference,
                     baselines={"public": open_public}, **FAST)
    assert opened == ["reference", "public"]  # the reference first: the KS tests compare against it
    assert [r["label"] for r in loaded["rows"]] == [r["label"] for r in given["rows"]] == ["public", "model", "reference"]
    for a, b in zip(loaded["rows"], given["rows"]):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
