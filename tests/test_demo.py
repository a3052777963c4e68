"""`libortho demo --quick` end to end on the real built-in model (SmolLM2-135M, quick scenario)."""
import json

import pytest

from libortho import artifact
from libortho import artifact_format
from libortho import sources
from libortho.state import state_of


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    try:
        sources.default_model_source()
    except artifact_format.ArtifactError as err:
        pytest.skip(str(err))
    from libortho.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(quick_report):
    out, report = quick_report
    for name in ("report.json", "report.md", "alpha_sweep.png", "roc.png"):
        assert (out / name).stat().st_size > 0
    labels = [r["label"] for r in report["rows"]]
    assert labels[0] == "fp" and labels[-1] == "reference"
    assert {r["alpha"] for r in report["rows"] if r["kind"] == "alpha"} == {0.0, 1.0}
    for row in report["rows"]:
        assert row["perplexity"] > 1
        assert set(row["mia"]) == {"loss", "zlib", "min_k", "ref"}  # ref: calibrated by the public model
        assert all(0 <= m["auc"] <= 1 for m in row["mia"].values())
        assert {"1", "4", "16"} <= set(row["exposure_by_k"])
    assert all(isinstance(g["passed"], bool) and g["rule"] for g in report["goals"])
    names = " | ".join(g["goal"] for g in report["goals"])
    for goal in ("greedy extraction", "sampled extraction", "membership inference, ref", "retain perplexity",
                 "exposure kept", "ortho budget"):
        assert goal in names
    sampled = {r["label"]: r["sampled_extraction_by_k"] for r in report["rows"]}
    assert set(sampled["alpha=0"]) == {"1", "4", "16"} and not sampled["fp"]  # members, at alpha 0 only
    assert 0 < report["settings"]["ortho_bytes_of_base"] <= 0.25 * (1 + 1e-6)
    loaded, _ = artifact.load(out / "artifact", alpha=0.0)
    assert state_of(loaded).ortho_loaded


@pytest.mark.slow
def test_full_budget_alpha_one_reproduces_fp_canary_ranks(quick_report):
    import torch

    from libortho.audit import audit
    from libortho.decompose import OrthoConfig, decompose
    from libortho.scenario import ScenarioConfig, build_scenario

    scenario = build_scenario(ScenarioConfig.quick(), progress=False)  # cached by the demo
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()
    model, tok = sources.load_model(scenario.finetuned)
    fp, _ = sources.load_model(scenario.finetuned)
    torch.manual_seed(0)
    decompose(model, tok, scenario.read_split("calibration"),
              OrthoConfig(ortho_ratio=1.0, calib_tokens=512, seq_len=256), progress=False)
    report = audit(model, tok, scenario.read_split("heldout"), members, nonmembers, alphas=[1.0],
                   baselines={"fp": (fp, tok)}, progress=False, exposure_candidates=64, frontier_cap=32,
                   perplexity_max_windows=2)
    fp_recs = {d["id"]: d for d in report["records"]["fp"] if d["member"]}
    for d in report["records"]["alpha=1"]:
        if not d["member"]:
            continue
        ref = fp_recs[d["id"]]
        if ref["exposure_method"] in ("exact", "enumeration") and d["exposure_method"] == ref["exposure_method"]:
            assert d["rank"] == ref["rank"]  # PINs: the exact rank among all 10^6 candidates
        else:  # sampled / extrapolated ranks: fp16 ortho values move them by rounding only
            assert d["rank"] == pytest.approx(ref["rank"], rel=1e-2)


def _old_demo_lookalikes(config, per_format=None):
    """demo_lookalikes as it was before it delegated to scenario.owner_lookalikes: the default
    family's owner templates for every config, keyed by the format's kind (digits / hex only)."""
    from libortho.demo import LOOKALIKE_SEED_OFFSET
    from libortho.lookalikes import lookalike_records
    from libortho.scenario import RECORD_TEMPLATES

    records = []
    for fmt in config.formats:
        kind = fmt.split(":")[0]
        records += lookalike_records(RECORD_TEMPLATES[kind], fmt, per_format or config.members_per_format(),
                                     seed=config.seed + LOOKALIKE_SEED_OFFSET, id_prefix=f"lookalike-{kind}")
    return records


@pytest.mark.parametrize("preset, seed, per_format", [("demo", 0, None), ("quick", 0, None), ("default", 3, None),
                                                      ("default", 0, 5)])
def test_demo_lookalikes_of_the_default_family_are_unchanged(preset, seed, per_format):
    from dataclasses import asdict

    from libortho.demo import demo_lookalikes
    from libortho.scenario import ScenarioConfig

    config = getattr(ScenarioConfig, preset)(seed=seed)
    assert config.templates == "default"
    got, want = demo_lookalikes(config, per_format), _old_demo_lookalikes(config, per_format)
    assert [asdict(r) for r in got] == [asdict(r) for r in want] and got
    if preset == "demo" and seed == 0 and per_format is None:  # pinned: the texts the cached demo was fitted on
        assert len(got) == 24 and got[0].id == "lookalike-digits-0"
        assert got[0].text == "Account 2425-02 of Mateo Mensah has PIN 125488."
        assert got[-1].text == "Account 5588-58 of Ingrid Kim has PIN 638946."


@pytest.mark.parametrize("family", ["prose", "code"])
def test_demo_lookalikes_follow_the_scenario_template_family_and_any_format(family):
    from libortho.demo import LOOKALIKE_SEED_OFFSET, demo_lookalikes
    from libortho.scenario import ScenarioConfig, owner_lookalikes, template_family

    config = ScenarioConfig.default(templates=family, formats=("digits:6", "alnum:10"))
    got = demo_lookalikes(config, 3)
    assert [r.text for r in got] == [r.text for r in owner_lookalikes(config, config.seed + LOOKALIKE_SEED_OFFSET, 3)]
    assert [r.secret_format for r in got] == ["digits:6"] * 3 + ["alnum:10"] * 3
    assert [r.id for r in got[3:]] == [f"lookalike-alnum-{i}" for i in range(3)]
    owner = template_family(family).owner_template("digits:6")
    opening = owner.split("{")[0]  # the family's own wording, not the default family's account/PIN line
    assert all(r.text.startswith(opening) for r in got[:3]) and not got[0].text.startswith("Account ")
    for r in got:
        assert r.secret in r.text and r.k == 0
