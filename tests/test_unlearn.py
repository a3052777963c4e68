"""Known-answer tests for libortho.unlearn (NPO + RT, gradient difference, the stopping rule) on a
tiny offline model (CPU, seconds)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from libortho import privacy as P
from libortho import unlearn as U
from libortho.evaluation import perplexity
from conftest import train_on
from test_audit import PUBLIC_TEXT, char_tokenizer, make_records, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finetuned():
    """A tiny model fine-tuned on public text and the member records (each 4 times)."""
    tok = char_tokenizer()
    members, nonmembers = make_records()
    model = tiny_llama(len(tok), seed=0)
    chunks = [PUBLIC_TEXT[i : i + 60] for i in range(0, 240, 60)]
    train_on(model, tok, chunks + [r.text for r in members for _ in range(4)], steps=100)
    return tok, model, members, nonmembers


def forget_logprob(model, tok, texts) -> float:
    """Summed log-likelihood (nats) of the texts."""
    return sum(float(lp.sum()) for lp in P.token_logprobs(model, tok, texts))


@pytest.mark.parametrize("method", U.METHODS)
def test_unlearning_lowers_forget_likelihood(finetuned, method):
    tok, ft, members, _ = finetuned
    forget, kept = [r.text for r in members[:2]], [r.text for r in members[2:]]  # two records each
    model = copy.deepcopy(ft)
    log = U.unlearn(model, tok, forget, PUBLIC_TEXT, U.UnlearnConfig(method=method, lr=1e-3, steps=10, seq_len=64))
    drop_forget = forget_logprob(ft, tok, forget) - forget_logprob(model, tok, forget)
    drop_kept = forget_logprob(ft, tok, kept) - forget_logprob(model, tok, kept)
    assert drop_forget > 0 and drop_forget > drop_kept  # the forget set loses more than other members
    if method == "npo":  # theta = ref at the first step: -(2/beta) log sigmoid(0) = (2/beta) ln 2
        assert log.forget_loss[0] == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)
    assert len(log.forget_loss) == len(log.retain_loss) == 10
    # only the decoder blocks' linear weights changed
    before, after = dict(ft.named_parameters()), dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".layers." in n and n.endswith("_proj.weight") for n in changed)
    assert not any(p.requires_grad for p in model.parameters())


def test_npo_lowers_forget_exposure_more_than_that_of_other_records(finetuned):
    tok, ft, members, _ = finetuned
    forget, kept = members[:2], members[2:]
    model = copy.deepcopy(ft)
    U.unlearn(model, tok, [r.text for r in forget], PUBLIC_TEXT, U.UnlearnConfig(lr=1e-3, steps=10, seq_len=64))
    drop = {name: U.forget_exposure(ft, tok, recs, frontier_cap=32) - U.forget_exposure(model, tok, recs, frontier_cap=32)
            for name, recs in (("forget", forget), ("kept", kept))}
    assert drop["forget"] > 1.0 and drop["forget"] > drop["kept"]


def test_a_short_run_is_the_start_of_a_longer_one(finetuned):
    tok, ft, members, _ = finetuned
    forget = [r.text for r in members]
    snapshots = {}

    def keep(step, m):
        if step == 3:
            snapshots[step] = {n: p.detach().clone() for n, p in m.named_parameters()}

    long = copy.deepcopy(ft)
    U.unlearn(long, tok, forget, PUBLIC_TEXT, U.UnlearnConfig(lr=1e-3, steps=5, seq_len=64, forget_batch=3, seed=4),
              callback=keep)
    short = copy.deepcopy(ft)
    U.unlearn(short, tok, forget, PUBLIC_TEXT, U.UnlearnConfig(lr=1e-3, steps=3, seq_len=64, forget_batch=3, seed=4))
    for name, p in short.named_parameters():
        torch.testing.assert_close(p, snapshots[3][name], rtol=0, atol=0)


def test_unlearn_rejects_bad_inputs(finetuned):
    tok, ft, members, _ = finetuned
    with pytest.raises(ValueError, match="unknown unlearning method"):
        U.unlearn(ft, tok, [members[0].text], PUBLIC_TEXT, U.UnlearnConfig(method="ga"))
    with pytest.raises(ValueError, match="no forget texts"):
        U.unlearn(ft, tok, [], PUBLIC_TEXT)


@pytest.mark.parametrize("options, message", [
    (dict(lr=0.0), "lr must be > 0"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(retain_weight=-0.5), "retain_weight must be >= 0"),
    (dict(seq_len=1), "seq_len must be >= 2"),
    (dict(retain_batch=0), "retain_batch must be >= 1"),
    (dict(forget_batch=0), "forget_batch must be >= 1 or None"),
    (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
    (dict(train_blocks=0), "train_blocks as an int must be >= 1"),
])
def test_unlearn_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        U.UnlearnConfig(**options)


def test_unlearn_config_is_plain_hashable_data():
    config = U.UnlearnConfig(train_blocks=[1, -1])
    assert config.train_blocks == (1, -1) and hash(config) == hash(U.UnlearnConfig(train_blocks=(1, -1)))
    with pytest.raises(AttributeError):
        config.lr = 1.0


def test_choose_point_known_answers():
    pt = U.SweepPoint
    points = [pt(0.0, 0, 10.0, 20.0), pt(1e-4, 10, 3.0, 20.5), pt(1e-4, 20, 1.5, 20.9), pt(3e-4, 10, 1.0, 20.6),
              pt(3e-4, 20, 0.5, 25.0)]
    # reached the reference's 1.5 bits within 1.05 x 20: 20.9 and 20.6 qualify, the lower perplexity wins
    assert U.choose_point(points, reference_exposure=1.5, fp_perplexity=20.0) == (points[3], "reached")
    # nothing reaches 0.2 bits within the bound: lowest exposure within it
    assert U.choose_point(points, 0.2, 20.0) == (points[3], "best within perplexity bound")
    # a bound nothing meets: least perplexity
    assert U.choose_point(points[1:], 0.2, 10.0) == (points[1], "no point within perplexity bound")
    with pytest.raises(ValueError, match="no sweep points"):
        U.choose_point([], 1.0, 1.0)


def test_select_unlearning_reruns_the_chosen_point(finetuned):
    tok, ft, members, _ = finetuned
    forget = members[:2]
    texts = [r.text for r in forget]

    def measure(m):
        return U.forget_exposure(m, tok, forget, frontier_cap=32), perplexity(m, tok, PUBLIC_TEXT, window=64)

    fp_exposure, fp_ppl = measure(ft)
    sel = U.select_unlearning(lambda: copy.deepcopy(ft), tok, texts, PUBLIC_TEXT, measure,
                              reference_exposure=fp_exposure - 2.0, fp_perplexity=fp_ppl,
                              config=U.UnlearnConfig(steps=4, seq_len=64), lrs=(3e-4, 1e-3), eval_every=2)
    assert [(p.lr, p.steps) for p in sel.points] == [(0.0, 0), (3e-4, 2), (3e-4, 4), (1e-3, 2), (1e-3, 4)]
    assert sel.point in sel.points and sel.reason in ("reached", "best within perplexity bound",
                                                      "no point within perplexity bound")
    assert sel.point == U.choose_point(sel.points, fp_exposure - 2.0, fp_ppl)[0]
    exposure, ppl = measure(sel.model)  # the returned model is the measured checkpoint
    assert exposure == pytest.approx(sel.point.forget_exposure) and ppl == pytest.approx(sel.point.perplexity)
    assert sel.summary()["chosen"]["lr"] == sel.point.lr
