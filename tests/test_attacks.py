"""Known-answer tests for the public-model-calibrated membership attack (privacy.membership), extraction by
sampling (privacy.extraction), TPR at the lowest resolvable FPR, and their wiring into the audit, on tiny
offline models (CPU, seconds)."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from libortho import audit as A
from libortho import privacy as P
from libortho.privacy.extraction import _sample_tokens
from conftest import train_on
from test_audit import PUBLIC_TEXT, char_tokenizer, tiny_llama

N_PER_GROUP = 12  # members, non-members, and "other" records of the same template


def template_records(seed: int, n: int, tag: str, fmt: str = "digits:4") -> list[P.CanaryRecord]:
    """Records of one template ("PIN of <name> is <secret>") with random names and secrets."""
    rng = random.Random(f"{tag}:{seed}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    spec = P.parse_format(fmt)
    out = []
    for i in range(n):
        name = rng.choice(letters).upper() + "".join(rng.choice(letters) for _ in range(4))
        secret = "".join(rng.choice(spec.alphabet) for _ in range(spec.length))
        out.append(P.CanaryRecord(f"{tag}{i}", f"PIN of {name} is ", secret, fmt, k=1 if tag == "m" else 0))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting():
    """P (untrained), a copy trained on the members, a copy trained on other records of the template."""
    tok = char_tokenizer()
    members = template_records(0, N_PER_GROUP, "m")
    nonmembers = template_records(0, N_PER_GROUP, "n")
    others = template_records(0, N_PER_GROUP, "o")
    public = tiny_llama(len(tok), seed=0)
    on_members = copy.deepcopy(public)
    train_on(on_members, tok, [r.text for r in members], steps=120)
    on_others = copy.deepcopy(public)
    train_on(on_others, tok, [r.text for r in others], steps=120)
    return tok, public, on_members, on_others, members, nonmembers


def calibrated_auc(model, public, tok, members, nonmembers) -> float:
    pub = A.public_record_losses(public, tok, members, nonmembers)
    scores = {}
    for group, recs in (("m", members), ("n", nonmembers)):
        losses = P.mia_scores(model, tok, [r.text for r in recs]).loss
        scores[group] = P.reference_calibrated_scores(losses, P.public_losses_for(pub, recs))
    return P.mia_metrics(scores["m"], scores["n"]).auc


def test_calibrated_attack_auc_one_on_memorised_members(setting):
    tok, public, on_members, _, members, nonmembers = setting
    assert calibrated_auc(on_members, public, tok, members, nonmembers) == 1.0


def test_calibrated_attack_near_chance_on_a_model_trained_on_other_records(setting):
    tok, public, _, on_others, members, nonmembers = setting
    auc = calibrated_auc(on_others, public, tok, members, nonmembers)
    lo, hi = P.auc_confidence_interval(0.5, len(members), len(nonmembers))
    assert lo <= auc <= hi


def test_calibrated_score_is_zero_for_the_public_model_itself(setting):
    tok, public, _, _, members, nonmembers = setting
    pub = A.public_record_losses(public, tok, members, nonmembers)
    losses = P.mia_scores(public, tok, [r.text for r in members]).loss
    np.testing.assert_array_equal(P.reference_calibrated_scores(losses, P.public_losses_for(pub, members)), 0.0)
    with pytest.raises(ValueError, match="lack 1 record"):
        P.public_losses_for({k: v for k, v in pub.items() if k != members[0].id}, members)


def test_tpr_at_lowest_fpr_known_answers():
    # 4 non-members: FPR resolves 1/4. Threshold 3 admits one non-member (3.5) and three members.
    tpr, fpr = P.tpr_at_lowest_fpr([5, 4, 3, 0], [3.5, 1, 0.5, 0.2])
    assert (tpr, fpr) == (0.75, 0.25)
    assert P.tpr_at_lowest_fpr([2, 3], [0, 1, 1.5]) == (1.0, pytest.approx(1 / 3))
    # a member tied with the top non-member counts only when that tie keeps FPR at 1/n
    assert P.tpr_at_lowest_fpr([1.0, 0.0], [1.0, 0.5]) == (0.5, 0.5)
    assert P.tpr_at_lowest_fpr([1.0, 0.0], [1.0, 1.0]) == (0.0, 0.5)  # tie spans 2/2 non-members
    with pytest.raises(ValueError, match="at least one member"):
        P.tpr_at_lowest_fpr([], [1.0])


# ---------------------------------------------------------------------------------------
# Extraction by sampling
# ---------------------------------------------------------------------------------------

SECRET_RECORDS = [
    P.CanaryRecord("s1", "PIN of Ann is ", "4821", "digits:4", k=4),
    P.CanaryRecord("s2", "Key of Bob is ", "b3e9", "hex:4", k=4),
]
UNSEEN = [P.CanaryRecord("u1", "PIN of Cy is ", "730519", "digits:6"),
          P.CanaryRecord("u2", "Key of Dee is ", "5a0c71", "hex:6")]


@pytest.fixture(scope="module")
def emitter():
    tok = char_tokenizer()
    model = tiny_llama(len(tok), seed=3)
    train_on(model, tok, [r.text for r in SECRET_RECORDS], steps=100)
    return tok, model


def test_sampling_finds_an_emitted_secret_and_none_never_seen(emitter):
    tok, model = emitter
    found = P.sample_extract_secrets(model, tok, SECRET_RECORDS + UNSEEN, n_samples=64, seed=0)
    assert [r.extracted for r in found] == [True, True, False, False]
    assert all(r.n_samples == 64 for r in found)
    assert all(r.secret in f.example for r, f in zip(SECRET_RECORDS, found))
    assert all(f.hits == 0 for f in found[2:])


def test_sampling_with_top_k_one_is_greedy(emitter):
    tok, model = emitter
    records = SECRET_RECORDS + UNSEEN
    greedy = P.extract_secrets(model, tok, records, extra_tokens=4)
    sampled = P.sample_extract_secrets(model, tok, records, n_samples=5, top_k=1, seed=1)
    for g, s in zip(greedy, sampled):
        assert s.example == g.continuation and s.hits in (0, 5)


def test_sampling_is_seeded_and_independent_of_batching(emitter):
    tok, model = emitter
    records = SECRET_RECORDS + UNSEEN
    first = P.sample_extract_secrets(model, tok, records, n_samples=16, seed=7, max_rows=64)
    alone = [P.sample_extract_secrets(model, tok, [r], n_samples=16, seed=7, max_rows=16)[0] for r in records]
    assert first == alone
    untrained = tiny_llama(len(tok), seed=5)
    a = P.sample_extract_secrets(untrained, tok, records, n_samples=16, seed=7)
    b = P.sample_extract_secrets(untrained, tok, records, n_samples=16, seed=8)
    assert a == P.sample_extract_secrets(untrained, tok, records, n_samples=16, seed=7)
    assert [x.example for x in a] != [x.example for x in b]


def test_sampling_options_object_equals_its_keywords_and_rejects_bad_input(emitter):
    tok, model = emitter
    records = SECRET_RECORDS + UNSEEN
    by_object = P.sample_extract_secrets(model, tok, records, P.Sampling(n_samples=8, top_k=5, seed=3))
    assert by_object == P.sample_extract_secrets(model, tok, records, n_samples=8, top_k=5, seed=3)
    with pytest.raises(ValueError, match="not both"):
        P.sample_extract_secrets(model, tok, records, P.Sampling(), seed=1)
    with pytest.raises(TypeError, match="unknown sampling option.*n_sample"):
        P.sample_extract_secrets(model, tok, records, n_sample=8)
    for bad, match in [(dict(n_samples=0), "n_samples"), (dict(temperature=0.0), "temperature"),
                       (dict(top_k=-1), "top_k")]:
        with pytest.raises(ValueError, match=match):
            P.Sampling(**bad)


def test_sampler_draws_from_the_top_k_distribution():
    # Inverse-CDF draws over softmax(top-k / T) match the exact probabilities.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = _sample_tokens(logits, u, temperature=2.0, top_k=3)
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    expected = torch.zeros(5, dtype=torch.float64)
    expected[[4, 0, 1]] = torch.softmax(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64) / 2.0, dim=0)
    assert torch.allclose(freq, expected, atol=0.01)


# ---------------------------------------------------------------------------------------
# Wired into the audit and the CLI
# ---------------------------------------------------------------------------------------

FAST = {"frontier_cap": 32, "perplexity_window": 64, "progress": False, "exposure_candidates": 50, "white_box": False}


def test_audit_reports_calibrated_attack_sampling_and_goals(setting, tmp_path):
    tok, public, on_members, _, members, nonmembers = setting
    report = A.audit(on_members, tok, PUBLIC_TEXT, members, nonmembers, reference=public, public_model=public,
                     sample_extraction=8, out_dir=tmp_path, exposure_formats=(), **FAST)
    model, ref = report["rows"]
    assert set(model["mia"]) == {"loss", "zlib", "min_k", "ref"}
    assert model["mia"]["ref"]["auc"] == 1.0 and ref["mia"]["ref"]["auc"] == 0.5  # P is the reference here
    for m in model["mia"].values():
        assert m["lowest_fpr"] == pytest.approx(1 / len(nonmembers)) and 0 <= m["tpr_at_lowest_fpr"] <= 1
        assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
    assert model["sampled_extraction_by_k"]["1"] >= model["extraction_by_k"]["1"] > 0
    assert ref["sampled_extraction_rate"] == 0.0
    assert set(report["public_losses"]) == {r.id for r in members + nonmembers}
    goals = report["goals"]
    assert goals and all({"attack", "comparator", "rule", "measured", "passed"} <= set(g) for g in goals)
    assert any(g["goal"].endswith("membership inference, ref") and not g["passed"] for g in goals)
    md = (tmp_path / "report.md").read_text()
    assert "P-calibrated loss" in md and "sampled extraction k=1" in md and "## Goals" in md
    assert f"TPR at FPR 1/{len(nonmembers)}" in md
    assert (tmp_path / "auc_alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # cached P losses give the same report rows; no P in memory needed
    again = A.audit(on_members, tok, PUBLIC_TEXT, members, nonmembers, public_losses=report["public_losses"],
                    sample_extraction=0, **FAST)
    assert again["rows"][0]["mia"]["ref"] == model["mia"]["ref"]
    assert "sampled_extraction_by_k" not in again["rows"][0] or not again["rows"][0]["sampled_extraction_by_k"]


def test_audit_separates_measured_and_extrapolated_exposure(setting, tmp_path):
    tok, _, on_members, _, members, nonmembers = setting
    key = P.CanaryRecord("key", "Key of Bob is ", "a1b2c3d4e5f6", "hex:12", k=1)
    report = A.audit(on_members, tok, PUBLIC_TEXT, members[:4] + [key], nonmembers[:4], sample_extraction=2,
                     sample_nonmembers=False, out_dir=tmp_path, **FAST)
    row = report["rows"][0]
    by_id = {d["id"]: d for d in report["records"]["model"]}
    assert all(("sampled_extracted" in by_id[r.id]) == (r.k > 0) for r in members[:4] + nonmembers[:4])
    assert set(row["sampled_extraction_by_k"]) == {"1"}
    assert by_id["key"]["exposure_method"] == "skewnorm"
    measured = [by_id[r.id]["exposure"] for r in members[:4]]
    assert row["measured_exposure_by_k"]["1"] == pytest.approx(np.mean(measured))
    assert row["extrapolated_exposure_by_k"]["1"] == pytest.approx(by_id["key"]["exposure"])
    md = (tmp_path / "report.md").read_text()
    headline = md.split("## Membership inference")[0]
    assert "extrapolated" not in headline.split("| condition")[1]  # headline columns: measured only
    assert "## Extrapolated exposure (skew-normal fit, not a measured rank)" in md


def test_audit_samples_only_the_chosen_conditions(setting):
    tok, public, on_members, _, members, nonmembers = setting
    report = A.audit(on_members, tok, PUBLIC_TEXT, members[:4], nonmembers[:4], reference=public,
                     sample_extraction=2, sample_conditions=["reference"], exposure_formats=(), **FAST)
    model, ref = report["rows"]
    assert not model["sampled_extraction_by_k"] and set(ref["sampled_extraction_by_k"]) == {"1", "nonmember"}
    assert not any("sampled_extracted" in d for d in report["records"]["model"])
    assert report["settings"]["sample_extraction"]["conditions"] == ["reference"]
    with pytest.raises(ValueError, match=r"names no condition of this audit: \['alpha=0'\]"):
        A.audit(on_members, tok, PUBLIC_TEXT, members[:4], nonmembers[:4], sample_extraction=2,
                sample_conditions=["alpha=0"], **FAST)
    with pytest.raises(ValueError, match="list of labels"):
        A.audit(on_members, tok, PUBLIC_TEXT, members[:4], nonmembers[:4], sample_extraction=2,
                sample_conditions="model", **FAST)


def test_cli_audit_with_public_model(setting, tmp_path, capsys):
    from libortho.cli import main

    tok, public, on_members, _, members, nonmembers = setting
    for name, model in (("model", on_members), ("public", public)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    P.save_records(members[:4], tmp_path / "members.jsonl")
    P.save_records(nonmembers[:4], tmp_path / "nonmembers.jsonl")
    (tmp_path / "public.txt").write_text(PUBLIC_TEXT)
    rc = main(["audit", str(tmp_path / "model"), "--public", str(tmp_path / "public.txt"),
               "--private", str(tmp_path / "members.jsonl"), "--nonmembers", str(tmp_path / "nonmembers.jsonl"),
               "--public-model", str(tmp_path / "public"), "--sample-extraction", "4", "--candidates", "20",
               "--frontier-cap", "16", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"][0]["mia"]["ref"]["auc"] == 1.0
    assert report["settings"]["sample_extraction"]["samples"] == 4
    with pytest.raises(SystemExit):
        main(["audit", "x", "--public", "p", "--private", "m", "--nonmembers", "n", "--sample-extraction", "-1"])


def test_cli_audit_public_model_default_is_the_built_in_model(setting, tmp_path, monkeypatch):
    """`--public-model default` names the built-in model in audit as it does in decompose."""
    from libortho import sources
    from libortho.cli import main

    tok, public, on_members, _, members, nonmembers = setting
    for name, model in (("model", on_members), ("public", public)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    monkeypatch.setattr(sources, "default_model_source", lambda: str(tmp_path / "public"))
    P.save_records(members[:4], tmp_path / "members.jsonl")
    P.save_records(nonmembers[:4], tmp_path / "nonmembers.jsonl")
    (tmp_path / "public.txt").write_text(PUBLIC_TEXT)
    rc = main(["audit", str(tmp_path / "model"), "--public", str(tmp_path / "public.txt"),
               "--private", str(tmp_path / "members.jsonl"), "--nonmembers", str(tmp_path / "nonmembers.jsonl"),
               "--public-model", "default", "--sample-extraction", "0", "--candidates", "20",
               "--frontier-cap", "16", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"][0]["mia"]["ref"]["auc"] == 1.0
