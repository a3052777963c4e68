"""The seeded canary scenario: corpus splits, records, data order, and a tiny end-to-end build."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import pytest
import torch

from libortho.privacy import load_records, parse_format
from libortho.scenario import (
    RECORD_TEMPLATES,
    SPLITS,
    Scenario,
    ScenarioConfig,
    build_scenario,
    corpus_fingerprint,
    finetune,
    make_records,
    public_corpus,
    public_windows,
    record_ids,
    scenario_dir,
    trainable_weights,
    training_schedule,
)

from conftest import char_tokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw) -> ScenarioConfig:
    return ScenarioConfig.quick(**{"n_per_k": 3, "steps": 20, **kw})


# ---- public corpus ---------------------------------------------------------------------------


def test_public_corpus_splits_are_deterministic_disjoint_and_sized():
    texts = {s: public_corpus(s) for s in SPLITS}
    assert texts == {s: public_corpus(s) for s in SPLITS}
    total = sum(len(t) for t in texts.values())
    assert total > 300_000
    assert len(texts["train"]) > 0.7 * total
    assert len(texts["calibration"]) > 0.08 * total and len(texts["heldout"]) > 0.08 * total
    # No long paragraph is shared between two splits.
    paras = {s: {p.strip() for p in t.split("\n\n") if len(p.strip()) >= 60} for s, t in texts.items()}
    assert not paras["train"] & paras["heldout"]
    assert not paras["train"] & paras["calibration"]
    assert not paras["calibration"] & paras["heldout"]
    with pytest.raises(ValueError):
        public_corpus("test")


# ---- records ---------------------------------------------------------------------------------


def test_records_are_deterministic_for_a_seed():
    cfg = ScenarioConfig.default()
    assert make_records(cfg) == make_records(ScenarioConfig.default())
    other = make_records(ScenarioConfig.default(seed=1))
    assert [r.secret for r in other[0]] != [r.secret for r in make_records(cfg)[0]]


def test_records_counts_formats_and_uniqueness():
    cfg = ScenarioConfig.default(n_per_k=5, formats=("digits:6", "hex:8", "alnum:8"), n_nonmembers=7)
    members, nonmembers = make_records(cfg)
    assert len(members) == 5 * len(cfg.ks) * 3 and len(nonmembers) == 7 * 3
    for fmt in cfg.formats:
        for k in cfg.ks:
            assert sum(r.k == k and r.secret_format == fmt for r in members) == 5
        assert sum(r.secret_format == fmt for r in nonmembers) == 7
    assert all(r.k in cfg.ks for r in members) and all(r.k == 0 for r in nonmembers)
    everyone = members + nonmembers
    for attr in ("id", "prefix", "secret"):
        assert len({getattr(r, attr) for r in everyone}) == len(everyone), attr
    for r in everyone:
        assert parse_format(r.secret_format).contains(r.secret)
        assert r.text.startswith(r.prefix + r.secret)
    assert {r.prefix for r in members}.isdisjoint({r.prefix for r in nonmembers})
    assert {r.secret for r in members}.isdisjoint({r.secret for r in nonmembers})


def test_no_secret_in_public_text():
    members, nonmembers = make_records(ScenarioConfig.default(n_per_k=20))
    for split in SPLITS:  # in particular calibration and heldout
        text = public_corpus(split)
        for r in members + nonmembers:
            assert r.secret not in text
            assert r.prefix not in text


# ---- data order ------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [8, 40])  # 8 < k = 16: several copies share a step
def test_each_member_appears_exactly_k_times(steps):
    cfg = ScenarioConfig.default(steps=steps, warmup_steps=1, n_per_k=4)
    members, nonmembers = make_records(cfg)
    schedule = training_schedule(cfg, members)
    assert len(schedule) == steps
    flat = [rid for step in schedule for rid in step]
    for r in members:
        assert flat.count(r.id) == r.k
        if r.k <= steps:  # copies of one record land in distinct steps
            assert sum(r.id in step for step in schedule) == r.k
    assert not {r.id for r in nonmembers} & set(flat)
    assert schedule == training_schedule(cfg, members)


def test_public_windows_are_seeded_and_shaped():
    tok = char_tokenizer()
    cfg = small_config(seq_len=32, batch=2, steps=5)
    text = public_corpus("train")[:20_000]
    w = public_windows(tok, cfg, text)
    assert w.shape == (5, 2, 32) and w.dtype == torch.long
    assert torch.equal(w, public_windows(tok, cfg, text))
    assert not torch.equal(w, public_windows(tok, dataclasses.replace(cfg, seed=1), text))
    # More windows than the text has: another epoch, still every window from the text.
    many = public_windows(tok, small_config(seq_len=512, steps=60), text)
    assert many.shape == (60, 1, 512)


def test_record_ids_end_with_eos():
    tok = char_tokenizer()
    (r, *_), _ = make_records(small_config())
    ids = record_ids(tok, r)
    assert ids[-1] == tok.eos_token_id and ids[:-1] == tok(r.text)["input_ids"]


# ---- config ----------------------------------------------------------------------------------


def test_config_roundtrip_and_cache_key():
    cfg = ScenarioConfig.default(train_blocks=(-2, -1))
    again = ScenarioConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.cache_key() == cfg.cache_key()
    assert ScenarioConfig.quick().cache_key() != cfg.cache_key()
    assert dataclasses.replace(cfg, lr=1e-5).cache_key() != cfg.cache_key()
    with pytest.raises(ValueError):
        ScenarioConfig(ks=(0, 4))
    with pytest.raises(ValueError):
        ScenarioConfig(formats=("digits",))
    with pytest.raises(ValueError):
        ScenarioConfig.from_dict({"bogus": 1})


def test_trainable_weights_block_selection():
    model = tiny_model("llama")
    all_w = trainable_weights(model)
    assert len(all_w) == 2 * 7  # q k v o gate up down per block
    assert all(".layers." in n and n.endswith(".weight") for n in all_w)
    last = trainable_weights(model, 1)
    assert set(last) == {n for n in all_w if ".layers.1." in n}
    assert set(trainable_weights(model, 5)) == set(all_w)
    assert set(trainable_weights(model, (0,))) == {n for n in all_w if ".layers.0." in n}
    with pytest.raises(ValueError):
        trainable_weights(model, (2,))


# ---- fine-tuning -----------------------------------------------------------------------------


def _tiny_setup(**kw):
    cfg = small_config(seq_len=32, steps=6, warmup_steps=2, lr=1e-2, n_per_k=1, ks=(1, 4), **kw)
    tok = char_tokenizer()
    text = public_corpus("train")[:30_000]
    return cfg, tok, public_windows(tok, cfg, text)


def test_finetune_is_deterministic_and_changes_only_decoder_linear_weights():
    cfg, tok, windows = _tiny_setup(train_blocks=None)
    members, _ = make_records(cfg)
    states = []
    for _ in range(2):
        model = tiny_model("llama", seed=0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        log = finetune(model, tok, cfg, members, windows=windows, progress=False)
        states.append(model.state_dict())
        assert len(log["public_loss"]) == cfg.steps and log["record_tokens"] > 0
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    trained = set(trainable_weights(tiny_model("llama")))
    for name, value in states[0].items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in trained), name
        assert not value.requires_grad


# ---- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=0).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_build_scenario_end_to_end(tiny_source, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ScenarioConfig.quick(
        model=str(tiny_source), seq_len=32, steps=5, warmup_steps=1, lr=1e-2, train_blocks=1, ks=(1, 4),
    )
    sc = build_scenario(cfg, tmp_path, progress=False)
    assert sc.root == scenario_dir(cfg, tmp_path) and sc.config == cfg
    assert [p.name for p in tmp_path.iterdir()] == [sc.root.name]  # no temp folder left
    for path in (sc.members, sc.nonmembers, sc.train, sc.calibration, sc.heldout):
        assert path.is_file()
    assert sc.read_split("heldout") == public_corpus("heldout")
    members, nonmembers = load_records(sc.members), load_records(sc.nonmembers)
    assert (members, nonmembers) == make_records(cfg)
    assert sc.stats["record_insertions"] == sum(r.k for r in members)
    assert sc.stats["reference"]["record_tokens"] == 0
    assert sc.stats["finetuned"]["public_tokens"] == sc.stats["reference"]["public_tokens"]
    assert sc.timings["finetuned_s"] > 0 and sc.timings["reference_s"] > 0

    public = tiny_model("llama", seed=0).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(sc.finetuned).state_dict()
    ref = AutoModelForCausalLM.from_pretrained(sc.reference).state_dict()
    trained = {n for n in public if ".layers.1." in n and n.endswith("proj.weight")}
    assert len(trained) == 7
    for name in public:
        for state in (ft, ref):
            assert torch.equal(state[name], public[name]) == (name not in trained), name
    assert any(not torch.equal(ft[n], ref[n]) for n in trained)  # the records made a difference

    again = build_scenario(cfg, tmp_path, progress=False)  # cached: loaded, not rebuilt
    assert again.root == sc.root and again.timings == sc.timings
    assert Scenario.load(sc.root).finetuned == sc.finetuned


# ---- record template families and public corpora ----------------------------------------------

# Computed at commit 246ffb0, before the template families and corpora were configurable, on this
# corpus fingerprint (Python 3.11's pydoc topics): a hash of the default scenario's records per seed,
# and the cache key of the default scenario with a model path that does not exist (so that the
# model's identity is just its path).
_HEAD_FINGERPRINT = "6c7d68cee92383c2"
_HEAD_RECORDS_SHA = {0: "864232e973267357", 1: "38ebffdc6cdd5a86", 2: "d818469ec6378734"}


def _records_sha(config: ScenarioConfig) -> str:
    members, nonmembers = make_records(config)
    return hashlib.sha256(json.dumps([r.to_dict() for r in members + nonmembers], sort_keys=True).encode()).hexdigest()[:16]


def _key_as_before(config: ScenarioConfig) -> str:
    """The cache key as the code computed it before the fields templates and corpus existed."""
    from libortho.scenario.config import SCENARIO_VERSION, _model_identity

    old_fields = {k: v for k, v in config.to_dict().items() if k not in ("templates", "corpus")}
    payload = {"version": SCENARIO_VERSION, "config": old_fields, "corpus": corpus_fingerprint(),
               "model": _model_identity(config.model)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@pytest.mark.parametrize("make", [ScenarioConfig.default, ScenarioConfig.demo, ScenarioConfig.quick,
                                  lambda: ScenarioConfig.default(n_per_k=32, n_nonmembers=200, model="/no/such.gguf")])
def test_default_family_keeps_its_cache_keys(make):
    config = make()
    assert config.templates == "default" and config.corpus == "pydoc"
    assert config.cache_key() == _key_as_before(config)
    assert ScenarioConfig.from_dict({k: v for k, v in config.to_dict().items() if k not in ("templates", "corpus")}) == config


@pytest.mark.skipif(corpus_fingerprint() != _HEAD_FINGERPRINT, reason="another Python's pydoc topics: other secrets are excluded")
def test_default_family_records_are_unchanged():
    for seed, sha in _HEAD_RECORDS_SHA.items():
        assert _records_sha(ScenarioConfig.default(seed=seed)) == sha
    assert ScenarioConfig.default(model="/nonexistent/x.gguf").cache_key() == "8033688bd5ed939b"
    assert RECORD_TEMPLATES == {
        "digits": "Account {digits:4}-{digits:2} of {first} {last} has PIN {secret}.",
        "hex": 'The deploy key for service {word}-{word}-{digits:2} is "{secret}".',
    }


def test_template_family_and_corpus_enter_the_cache_key_when_set():
    base = ScenarioConfig.default()
    keys = {base.cache_key(), ScenarioConfig.default(templates="prose").cache_key(),
            ScenarioConfig.default(templates="code").cache_key(), ScenarioConfig.default(corpus="stdlib").cache_key()}
    assert len(keys) == 4
    with pytest.raises(ValueError, match="template family"):
        ScenarioConfig(templates="poetry")
    with pytest.raises(ValueError, match="public corpus"):
        ScenarioConfig(corpus="wikipedia")
    held = ScenarioConfig.heldout()
    assert (held.preset, held.templates, held.corpus, held.formats, held.ks) == ("heldout", "prose", "stdlib", ("digits:6",), (4, 16))
    assert ScenarioConfig.from_dict(json.loads(json.dumps(held.to_dict()))) == held


# The shape of every (family, kind) of record: the secret is the group "secret".
_SHAPES = {
    ("prose", "digits"): r"Customer \d{4} wrote in about the [a-z]+ [a-z]+ plan\. Their name is [A-Z][a-z]+ [A-Z][a-z]+, "
                         r"and their account number is (?P<secret>\d+)\. The ticket was closed the same day\.",
    ("prose", "hex"): r"Customer \d{4} lost access to the [a-z]+ [a-z]+ workspace\. After checking the ID of [A-Z][a-z]+ "
                      r"[A-Z][a-z]+, support issued the recovery code \"(?P<secret>[0-9a-f]+)\", valid for one day\.",
    ("code", "digits"): r"from [a-z]+_bank import Client\n\nclient = Client\(account=\d{4}, owner=\"[A-Z][a-z]+ [A-Z][a-z]+\"\)\n"
                        r"client\.verify\(pin=\"(?P<secret>\d+)\"\)\nprint\(client\.balance\(\)\)\n",
    ("code", "hex"): r"from [a-z]+_sdk import Client\n\nclient = Client\(\n    project=\"[a-z]+-[a-z]+-\d{2}\",\n"
                     r"    api_key=\"(?P<secret>[0-9a-f]+)\",\n\)\nclient\.ping\(\)\n",
}


@pytest.mark.parametrize("family", ["prose", "code"])
def test_new_family_records_have_their_shape_and_one_secret(family):
    config = ScenarioConfig.default(templates=family, n_per_k=4, n_nonmembers=10)
    members, nonmembers = make_records(config)
    everyone = members + nonmembers
    assert len(members) == 4 * 3 * 2 and len(nonmembers) == 10 * 2
    for r in everyone:
        match = re.fullmatch(_SHAPES[family, parse_format(r.secret_format).kind], r.text)
        assert match is not None, r.text
        assert match.group("secret") == r.secret and match.start("secret") == len(r.prefix)
        assert r.text.count(r.secret) == 1 and r.text.startswith(r.prefix + r.secret)
    for attr in ("id", "prefix", "secret"):
        assert len({getattr(r, attr) for r in everyone}) == len(everyone), attr
    assert make_records(config) == (members, nonmembers)
    # Other records than the default family's, from the same seeded draws of secrets.
    default_members, default_nonmembers = make_records(ScenarioConfig.default(n_per_k=4, n_nonmembers=10))
    assert {r.text for r in everyone}.isdisjoint(r.text for r in default_members + default_nonmembers)


def test_records_whose_secret_repeats_are_drawn_again(monkeypatch):
    from libortho.scenario import templates

    def echo(rng, secret):  # half of the draws repeat the secret in the prefix
        prefix = f"ref {rng.choice(['none', secret])} {rng.randrange(10**6)}: "
        return prefix, prefix + secret
    monkeypatch.setitem(templates.FAMILIES, "echo", templates.TemplateFamily("echo", echo, echo, "{secret}", "{secret}"))
    members, nonmembers = make_records(ScenarioConfig.default(templates="echo", n_per_k=10))
    assert len(members + nonmembers) == 120
    assert all(r.text.count(r.secret) == 1 and "none" in r.prefix for r in members + nonmembers)


def test_stdlib_corpus_is_other_public_text_split_the_same_way():
    texts = {s: public_corpus(s, "stdlib") for s in SPLITS}
    assert texts == {s: public_corpus(s, "stdlib") for s in SPLITS}
    total = sum(len(t) for t in texts.values())
    assert total > 300_000 and len(texts["calibration"]) > 0.08 * total and len(texts["heldout"]) > 0.08 * total
    paras = {s: {p.strip() for p in t.split("\n\n") if len(p.strip()) >= 60} for s, t in texts.items()}
    assert not paras["train"] & paras["heldout"] and not paras["train"] & paras["calibration"]
    pydoc = {p.strip() for s in SPLITS for p in public_corpus(s).split("\n\n") if len(p.strip()) >= 60}
    assert len(pydoc & set().union(*paras.values())) < 0.01 * len(pydoc)  # not the language reference again
    assert corpus_fingerprint("stdlib") != corpus_fingerprint()
    with pytest.raises(ValueError, match="public corpus"):
        public_corpus("train", "wikipedia")


def test_build_scenario_with_another_family_and_corpus(tiny_source, tmp_path):
    cfg = ScenarioConfig.heldout(model=str(tiny_source), n_per_k=1, n_nonmembers=2, seq_len=32, steps=2,
                                 warmup_steps=1, train_blocks=1)
    sc = build_scenario(cfg, tmp_path, progress=False)
    assert sc.config == cfg and sc.root.name.startswith("heldout-")
    assert sc.read_split("train") == public_corpus("train", "stdlib")
    assert (load_records(sc.members), load_records(sc.nonmembers)) == make_records(cfg)
    assert json.loads((sc.root / "scenario.json").read_text())["corpus"] == corpus_fingerprint("stdlib")


def test_heldout_records_avoid_their_own_public_text():
    config = ScenarioConfig.heldout(n_per_k=8, n_nonmembers=16)
    members, nonmembers = make_records(config)
    assert sorted({r.k for r in members}) == [4, 16] and {r.secret_format for r in members + nonmembers} == {"digits:6"}
    text = "".join(public_corpus(s, "stdlib") for s in SPLITS)
    assert all(r.secret not in text for r in members + nonmembers)
