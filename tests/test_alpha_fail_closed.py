"""Alpha stays where the user put it: threads, streamers and asyncio.to_thread started inside a
scope never run above it, one pass never mixes alphas, and every entry point starts at 0.

The model's default is set to 1 wherever a leak could hide, and every comparison is against
plain alpha-0 and alpha-1 runs that are checked to differ, so no test passes by accident."""
import asyncio
import threading
import time

import pytest
import torch
from transformers import TextIteratorStreamer

import libortho
from conftest import TEXT, tiny_model

PROMPT = "The quick brown"
NEW = 12


@pytest.fixture(scope="module")
def model(tokenizer):
    m = tiny_model("llama")
    cfg = libortho.OrthoConfig(calib_tokens=512, seq_len=64, group_size=32, method="rtn", ortho_ratio=0.3)
    libortho.decompose(m, tokenizer, TEXT, cfg, progress=False)
    return m


@pytest.fixture
def ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


def _generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=2, **kw)[0, ids.shape[1]:]


@pytest.fixture
def refs(model, ids):
    """Tokens at plain alpha 0 and alpha 1; they must differ, or the tests below would prove nothing."""
    with libortho.alpha(model, 0.0):
        t0 = _generate(model, ids)
    with libortho.alpha(model, 1.0):
        t1 = _generate(model, ids)
    assert not torch.equal(t0, t1)
    libortho.set_alpha(model, 1.0)  # the dangerous default: a leak would show as t1
    yield t0, t1
    libortho.set_alpha(model, 0.0)


def test_entry_points_start_at_alpha_zero(model, tokenizer, tmp_path):
    fresh = tiny_model("llama")
    libortho.decompose(fresh, tokenizer, TEXT, libortho.OrthoConfig(calib_tokens=256, seq_len=64, group_size=32, method="rtn"), progress=False)
    assert libortho.get_alpha(fresh) == 0.0
    loaded, _ = libortho.load(libortho.save(fresh, tokenizer, tmp_path / "a"))
    assert libortho.get_alpha(loaded) == 0.0


def _flipper(model, stop):
    while not stop.is_set():  # short sleeps: flips land inside passes without starving them of the GIL
        libortho.set_alpha(model, 0.0)
        time.sleep(1e-4)
        libortho.set_alpha(model, 1.0)
        time.sleep(1e-4)


@pytest.mark.parametrize("flip", [False, True], ids=["steady", "set_alpha flipping"])
def test_thread_streamer_and_to_thread_inside_a_scope_run_at_its_alpha(model, ids, tokenizer, refs, flip):
    t0, _ = refs
    stop = threading.Event()
    flipper = threading.Thread(target=_flipper, args=(model, stop))
    if flip:
        flipper.start()
    try:
        with libortho.alpha(model, 0.0):
            out = {}
            worker = threading.Thread(target=lambda: out.setdefault("thread", _generate(model, ids)))
            worker.start()
            worker.join()

            streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            gen = threading.Thread(target=lambda: out.setdefault("streamer", _generate(model, ids, streamer=streamer)))
            gen.start()
            streamed = "".join(streamer)
            gen.join()

            out["to_thread"] = asyncio.run(asyncio.to_thread(_generate, model, ids))
    finally:
        stop.set()
        if flip:
            flipper.join()
    for kind in ("thread", "streamer", "to_thread"):
        assert torch.equal(out[kind], t0), kind
    assert streamed == tokenizer.decode(t0, skip_special_tokens=True)


def test_unscoped_passes_never_mix_alphas_while_set_alpha_flips(model, ids, refs):
    with libortho.alpha(model, 0.0), torch.no_grad():
        l0 = model(ids).logits
    with libortho.alpha(model, 1.0), torch.no_grad():
        l1 = model(ids).logits
    assert not torch.allclose(l0, l1)
    stop = threading.Event()
    flipper = threading.Thread(target=_flipper, args=(model, stop))
    flipper.start()
    try:
        with torch.no_grad():
            outs = [model(ids).logits for _ in range(20)]
    finally:
        stop.set()
        flipper.join()
    assert all(torch.equal(o, l0) or torch.equal(o, l1) for o in outs)


def test_alpha_is_read_once_at_the_model_entry(model, ids, refs):
    """set_alpha in the middle of a pass (from a hook on the first layer) does not reach later layers."""
    libortho.set_alpha(model, 0.0)
    with torch.no_grad():
        l0 = model(ids).logits
    first = model.model.layers[0].self_attn.q_proj
    handle = first.register_forward_hook(lambda *_: libortho.set_alpha(model, 1.0))
    try:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, l0)
    finally:
        handle.remove()
    assert libortho.get_alpha(model) == 1.0  # the flip took effect for the next pass only


def test_unscoped_pass_runs_at_the_lowest_open_scope(model, ids, refs):
    t0, t1 = refs
    opened, release = threading.Event(), threading.Event()

    def hold(value):
        with libortho.alpha(model, value):
            opened.set()
            release.wait()

    holder = threading.Thread(target=hold, args=(0.0,))
    holder.start()
    opened.wait()
    try:
        assert torch.equal(_generate(model, ids), t0)  # default 1, a scope 0 open elsewhere: 0
        with libortho.alpha(model, 1.0):
            assert torch.equal(_generate(model, ids), t1)  # an explicit scope of its own is honoured
    finally:
        release.set()
        holder.join()
    assert torch.equal(_generate(model, ids), t1)  # no scope left: the default


def test_a_failing_pass_does_not_keep_its_alpha(model, ids, refs):
    _, t1 = refs
    libortho.set_alpha(model, 0.0)
    with pytest.raises(Exception):
        model(torch.full((1, 3), 10_000))  # token id out of range
    libortho.set_alpha(model, 1.0)
    assert torch.equal(_generate(model, ids), t1)


def test_cli_runs_artifacts_at_alpha_zero_unless_asked(model, tokenizer, tmp_path, capsys):
    import json

    from libortho.cli import main

    path = libortho.save(model, tokenizer, tmp_path / "a")
    text = tmp_path / "t.txt"
    text.write_text(TEXT[:400])
    outs = {}
    for flag in ([], ["--alpha", "0"], ["--alpha", "1"]):
        assert main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", str(NEW), *flag]) == 0
        outs[tuple(flag)] = capsys.readouterr().out
    assert outs[()] == outs[("--alpha", "0")] != outs[("--alpha", "1")]
    ppl = {}
    for flag in ([], ["--alpha", "0"]):
        assert main(["perplexity", str(path), "--text", str(text), "--window", "64", "--json", *flag]) == 0
        ppl[tuple(flag)] = json.loads(capsys.readouterr().out)["results"]
    assert ppl[()] == ppl[("--alpha", "0")] and ppl[()][0]["alpha"] == 0.0
