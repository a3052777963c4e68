"""The serving engine's slot cache on the CPU: its own Llama forward against transformers', chunked
prefill, per-row alpha through the cache, slots joining, leaving and being reused, and the engine
choosing its runner. No HTTP (tests/test_serve.py drives the same engine through the API)."""
from __future__ import annotations

import threading

import pytest
import torch

import libortho
from libortho.serve.config import MAX_BATCH_BY_DEVICE, ServeConfig
from libortho.serve.decode_graphs import bucket, row_buckets, width_bucket
from libortho.serve.engine import Engine, Job
from libortho.serve.kvbatch import BatchRunner
from libortho.serve.llama_step import LlamaStep, unsupported_reason
from libortho.serve.sampling import RowFailed, SamplingParams, sample
from libortho.serve.slot_runner import SlotRunner, plan_chunk
from libortho.serve.text import TextStream, decoder_of
from conftest import TEXT, char_tokenizer, tiny_model

PROMPTS = ["The quick brown", "Python is", "Lists, tuples and", "functions are first", "The lazy dog"]
DECOMPOSE = libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32, ortho_ratio=0.05, method="rtn")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def decomposed(arch: str):
    tok = char_tokenizer()
    model = tiny_model(arch)
    libortho.decompose(model, tok, TEXT, DECOMPOSE, progress=False)
    return model, tok


@pytest.fixture(scope="module")
def llama():
    return decomposed("llama")


class _Row:
    """The fields of an engine row that a runner reads and writes."""

    def __init__(self, ids: list[int], alpha: float) -> None:
        self.job = Job(ids, 100, SamplingParams(0.0), [], alpha, lambda e: None)
        self.slot, self.prefilled, self.next_token, self.generated = -1, 0, -1, 0


def run_rows(runner, rows: list[_Row], steps: int, feed: list[list[int]] | None = None) -> dict[int, list]:
    """Prefill the rows (as many chunks as it takes), then decode `steps` steps feeding row r the
    tokens feed[r] (default: 10, 11, ...); each row's logits [V] per step, by row index."""
    out: dict[int, list] = {i: [] for i in range(len(rows))}
    for r in rows:
        if r.slot < 0:
            runner.admit(r)
    while any(r.prefilled < len(r.job.prompt_ids) for r in rows):
        done, logits = runner.prefill([r for r in rows if r.prefilled < len(r.job.prompt_ids)])
        for r, row_logits in zip(done, logits):
            out[rows.index(r)].append(row_logits)
            r.generated = 1
    for s in range(steps):
        for i, r in enumerate(rows):
            r.next_token = feed[i][s] if feed else 10 + s
        order, logits = runner.decode(rows)
        for r, row_logits in zip(order, logits):
            out[rows.index(r)].append(row_logits)
            r.generated += 1
    return out


# ---- the forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_forward_equals_transformers_per_row_alpha(arch, llama):
    model, tok = llama if arch == "llama" else decomposed(arch)
    assert unsupported_reason(model, 256) is None
    runner = SlotRunner(model, ServeConfig(max_batch=4, prefill_chunk=7), 256)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    alphas = [0.0, 1.0, 0.5]
    feed = [[20 + i, 30 + i, 40 + i] for i in range(3)]
    got = run_rows(runner, [_Row(p, a) for p, a in zip(prompts, alphas)], 3, feed)
    for i, (prompt, alpha) in enumerate(zip(prompts, alphas)):
        ids = torch.tensor([prompt + feed[i]])
        with torch.no_grad(), libortho.alpha(model, alpha):
            ref = model(input_ids=ids).logits[0].float()
        want = ref[len(prompt) - 1:]  # the prompt's last token, then one per fed token
        assert len(got[i]) == len(want)
        for g, w in zip(got[i], want):
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)


def test_unsupported_models_are_named_and_use_the_padded_batch(tmp_path):
    gpt2 = tiny_model("gpt2")
    assert "gpt2" in unsupported_reason(gpt2, 256)
    with pytest.raises(ValueError, match="cannot run this model on the slot cache"):
        LlamaStep(gpt2, 256)
    tok = char_tokenizer()
    libortho.decompose(gpt2, tok, TEXT, DECOMPOSE, progress=False)
    engine = Engine(gpt2, tok, ServeConfig(max_batch=2))
    assert isinstance(engine.runner, BatchRunner)
    engine.start()
    try:
        assert all(generate(engine, [("The quick", 0.0), ("Python", 1.0)], 4))
    finally:
        engine.stop()


def test_chunked_prefill_equals_one_shot_prefill(llama):
    model, tok = llama
    prompt = tok("Lists, tuples and dictionaries are built-in types")["input_ids"]
    results = []
    for chunk in (3, 7, 256):
        runner = SlotRunner(model, ServeConfig(max_batch=2, prefill_chunk=chunk), 256)
        results.append(run_rows(runner, [_Row(prompt, 1.0)], 3)[0])
    for other in results[:2]:
        for a, b in zip(other, results[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- per-row alpha and slots ----------------------------------------------------------------------
def test_per_row_alpha_through_the_slot_cache_is_exact(llama):
    """Row i of a mixed-alpha batch: bit-identical logits (float32, CPU) when every neighbour's alpha
    is flipped, in prefill and decode; and against row i alone in the same slot, bit-identical in
    every decode step (the same shapes). Its first logits, from the prefill, may differ in the last
    bit there: the lm_head product over one finished prompt is a matrix-vector product, which BLAS
    sums in another order than a product over several rows."""
    model, tok = llama
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    alphas = [0.0, 1.0, 0.0, 1.0]
    mixed = run_rows(SlotRunner(model, ServeConfig(max_batch=4), 256),
                     [_Row(p, a) for p, a in zip(prompts, alphas)], 4)
    for i in range(4):
        flipped = [a if j == i else 1.0 - a for j, a in enumerate(alphas)]
        other = run_rows(SlotRunner(model, ServeConfig(max_batch=4), 256),
                         [_Row(p, a) for p, a in zip(prompts, flipped)], 4)
        assert all(torch.equal(a, b) for a, b in zip(mixed[i], other[i])), i
        runner = SlotRunner(model, ServeConfig(max_batch=4), 256)
        below = [_Row(prompts[j], 0.0) for j in range(i)]
        row = _Row(prompts[i], alphas[i])
        above = [_Row(prompts[j], 0.0) for j in range(i + 1, 4)]
        for r in below + [row] + above:  # the others hold their slots but never run: row i is alone in slot i
            runner.admit(r)
        assert row.slot == i
        solo = run_rows(runner, [row], 4)[0]
        runner.release(below + above)
        torch.testing.assert_close(mixed[i][0], solo[0], atol=1e-6, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(mixed[i][1:], solo[1:])), i
    differs = [not torch.equal(m, o) for m, o in zip(mixed[0], mixed[1])]
    assert all(differs)  # the rows really differ (alpha and prompt)


def test_rows_join_and_leave_mid_batch_and_slots_are_reused(llama):
    model, tok = llama
    jobs = [(p, a) for p in PROMPTS for a in (0.0, 1.0)]
    solo = {}
    engine = Engine(model, tok, ServeConfig(max_batch=1, max_wait_ms=0))
    engine.start()
    try:
        for j in jobs:
            solo[j] = generate(engine, [j], 12)[0]
    finally:
        engine.stop()
    # 10 requests of different lengths through 3 slots: rows join as others end, every slot is reused
    engine = Engine(model, tok, ServeConfig(max_batch=3, max_wait_ms=50))
    lengths, counts = [12 - i for i in range(len(jobs))], []
    engine.start()
    try:
        mixed = generate(engine, jobs, 12, lengths, counts)
    finally:
        engine.stop()
    assert sorted(counts) == [(i, min(n, 12)) for i, n in enumerate(lengths)]
    assert [i for i, _ in counts] != sorted(i for i, _ in counts)  # later, shorter rows ended before earlier ones
    for j, text in zip(jobs, mixed):
        assert solo[j].startswith(text)
    assert engine.runner.cache.taken == 0 and engine.metrics.max_batch_seen == 3
    assert any(solo[(p, 0.0)] != solo[(p, 1.0)] for p in PROMPTS)  # alpha matters on this model


def test_a_long_prompt_is_prefilled_between_decode_steps(llama):
    """A 60-token prompt read 4 tokens per step: the row already running keeps streaming meanwhile."""
    model, tok = llama
    engine = Engine(model, tok, ServeConfig(max_batch=2, max_wait_ms=200, prefill_chunk=4))
    order: list[tuple[str, str]] = []
    done = threading.Semaphore(0)

    def sink_for(name: str):
        def sink(event) -> None:
            order.append((name, event.kind))
            if event.kind != "text":
                done.release()
        return sink

    engine.start()
    try:
        engine.submit(Job(tok("Python is")["input_ids"], 40, SamplingParams(0.0), [], 1.0, sink_for("short")))
        engine.submit(Job(tok("The quick brown fox jumps over the lazy dog. " * 2)["input_ids"][:60], 4,
                          SamplingParams(0.0), [], 0.0, sink_for("long")))
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        engine.stop()
    first_long = order.index(("long", "text"))
    assert sum(1 for name, _ in order[:first_long] if name == "short") >= 10
    assert ("long", "done") in order and ("short", "done") in order


def test_a_cancelled_request_frees_its_slot(llama):
    model, tok = llama
    engine = Engine(model, tok, ServeConfig(max_batch=1, max_wait_ms=0))
    started = threading.Event()
    job = Job(tok("The quick")["input_ids"], 200, SamplingParams(0.0), [], 1.0,
              lambda e: started.set() if e.kind == "text" else None)
    engine.start()
    try:
        engine.submit(job)
        assert started.wait(30)
        job.cancel()
        assert generate(engine, [("Python is", 0.0)], 3)[0]  # the one slot serves the next request
    finally:
        engine.stop()
    assert engine.runner.cache.taken == 0


def test_what_a_broken_row_wrote_never_reaches_the_slots_next_request(llama):
    model, tok = llama
    runner = SlotRunner(model, ServeConfig(max_batch=2), 256)
    prompt = tok("The quick brown")["input_ids"]
    first = _Row(prompt, 1.0)
    clean = run_rows(runner, [first], 2)[0]
    runner.release([first])
    broken = _Row(prompt, 1.0)
    run_rows(runner, [broken], 1)
    slot, written = broken.slot, len(prompt) + 1  # its prompt and the one token it was fed
    for buf in runner.cache.k + runner.cache.v:
        buf[slot, :, :written] = float("nan")  # as if the row's forward had produced NaN
    runner.release([broken])
    short = _Row(prompt[:4], 1.0)  # reads columns the broken row wrote, masked
    assert all(torch.isfinite(x).all() for x in run_rows(runner, [short], 2)[0]) and short.slot == slot
    runner.release([short])
    later = _Row(prompt, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(run_rows(runner, [later], 2)[0], clean))


def test_padded_steps_equal_exact_steps(llama):
    """On a GPU every step is padded to its bucket (rows, tokens); forced here on the CPU, the
    padding must not change any real row's logits (it writes only the scratch column)."""
    model, tok = llama
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    alphas = [0.0, 1.0, 0.5, 1.0, 0.0]
    results = []
    for pad in (False, True):
        runner = SlotRunner(model, ServeConfig(max_batch=8, prefill_chunk=16), 256)
        runner.pad = pad
        results.append(run_rows(runner, [_Row(p, a) for p, a in zip(prompts, alphas)], 3))
        assert runner.stats.snapshot()["steps"]["decode"]["eager"] == 3
    for i in range(len(prompts)):
        for a, b in zip(results[0][i], results[1][i]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefill_chunks_are_a_prefix_of_the_queue_within_the_budget():
    buckets = row_buckets(64)
    assert plan_chunk([5, 6, 4], 256, buckets) == (3, 8)  # every short prompt whole, in one chunk
    assert plan_chunk([6] * 64, 256, buckets) == (32, 8)  # 32 prompts finished now beat 64 half-read
    assert plan_chunk([1000, 5, 5], 256, buckets) == (3, 64)  # the oldest row advances, the short ones finish
    assert plan_chunk([3], 256, buckets) == (1, 4)
    k, tokens = plan_chunk([60, 9], 4, row_buckets(2))
    assert bucket(k, row_buckets(2)) * tokens <= 4 and k == 2  # both rows advance, within the budget


def test_engine_counts_its_iterations_and_eager_steps(llama):
    model, tok = llama
    engine = Engine(model, tok, ServeConfig(max_batch=4, max_wait_ms=20))
    engine.start()
    try:
        generate(engine, [(p, float(i % 2)) for i, p in enumerate(PROMPTS[:4])], 6)
    finally:
        engine.stop()
    stats = engine.stats()
    assert stats["iterations"] >= 5 and stats["steps"]["decode"]["eager"] >= 5  # token 1 from the prefill
    assert stats["steps"]["decode"]["replays"] == 0 and stats["graphs"] == []  # the CPU has no graphs
    assert stats["prefill_tokens"] == sum(len(tok(p)["input_ids"]) for p in PROMPTS[:4])
    assert set(stats["seconds"]) >= {"admit", "prefill", "decode", "sample", "tokens", "release"}
    assert 0 < stats["prefill_share"] < 1 and stats["mean_iteration_ms"] > 0
    text = engine.metrics.render()
    assert 'libortho_engine_steps_total{kind="decode",event="eager"}' in text
    assert 'libortho_engine_seconds_total{phase="sample"}' in text


def test_admission_is_first_in_first_out(llama):
    """More requests than slots: they start in the order they came, so none starves."""
    model, tok = llama
    engine = Engine(model, tok, ServeConfig(max_batch=2, max_wait_ms=0))
    started: list[int] = []
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event) -> None:
            if event.kind == "text" and i not in started:
                started.append(i)
            if event.kind != "text":
                done.release()
        return sink

    engine.start()
    try:
        for i in range(8):
            engine.submit(Job(tok(PROMPTS[i % 5])["input_ids"], 4, SamplingParams(0.0), [], 0.0, sink_for(i)))
        for _ in range(8):
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert started == sorted(started) and len(started) == 8


def test_the_fast_decoder_equals_the_tokenizers_decode_and_streams_whole_text():
    tok = char_tokenizer()
    ids = tok("Lists, tuples and dictionaries are built-in types; functions are first-class objects.")["input_ids"]
    fast = decoder_of(tok)
    for window in (ids[:1], ids[3:9], ids):
        assert fast(window) == tok.decode(window, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stream = TextStream(tok, [])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)  # the window slides every few tokens


# ---- sampling, buckets, config --------------------------------------------------------------------
def test_sampling_is_per_row_seeded_and_isolated():
    logits = torch.randn(6, 50)
    logits[4] = float("nan")
    params = [SamplingParams(t, top_p=p, seed=s) for t, p, s in
              [(0.0, 1.0, 1), (1.0, 1.0, 2), (0.7, 0.5, 3), (1.3, 0.9, 4), (1.0, 1.0, 5), (1.0, 1e-9, 6)]]
    first = sample(logits, params)
    assert isinstance(first[4], RowFailed) and all(isinstance(t, int) for i, t in enumerate(first) if i != 4)
    assert first[0] == int(logits[0].argmax()) and first[5] == int(logits[5].argmax())  # top_p ~0: the top token
    again = sample(logits, [SamplingParams(p.temperature, top_p=p.top_p, seed=p.seed) for p in params])
    alone = sample(logits[2:3], [SamplingParams(0.7, top_p=0.5, seed=3)])
    assert again == first and alone == [first[2]]  # a row's draw depends on its own seed only
    # the draws follow the distribution: a two-token row at temperature 1 picks token 1 about 27 % of the time
    two = torch.tensor([[1.0, 0.0]]).log_softmax(-1)
    picks = [sample(two, [SamplingParams(1.0, seed=s)])[0] for s in range(400)]
    assert 0.2 < sum(picks) / 400 < 0.34


def test_buckets():
    assert row_buckets(64) == (1, 2, 4, 8, 16, 32, 64) and row_buckets(10) == (1, 2, 4, 8, 10)
    assert bucket(3, row_buckets(64)) == 4 and bucket(64, row_buckets(64)) == 64
    assert width_bucket(1, 8192) == 128 and width_bucket(129, 8192) == 256 and width_bucket(5000, 6000) == 6000


def test_max_batch_default_depends_on_the_device():
    assert ServeConfig().resolved_max_batch == MAX_BATCH_BY_DEVICE["cpu"] == 8
    assert ServeConfig(device="cuda").resolved_max_batch == MAX_BATCH_BY_DEVICE["cuda"] == 64
    assert ServeConfig(device="cuda", max_batch=3).resolved_max_batch == 3


# ---- helpers --------------------------------------------------------------------------------------
def generate(engine: Engine, jobs: list[tuple[str, float]], tokens: int, lengths: list[int] | None = None,
             counts: list[int] | None = None) -> list[str]:
    """Greedy texts of (prompt, alpha) jobs submitted together (job i: lengths[i] tokens); each
    job's completion tokens are appended to `counts` (in the order they end)."""
    texts: list[list[str]] = [[] for _ in jobs]
    errors: list[str] = []
    left = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event) -> None:
            texts[i].append(event.text)
            if event.kind == "error":
                errors.append(event.message)
            if event.kind == "done" and counts is not None:
                counts.append((i, event.completion_tokens))
            if event.kind != "text":
                left.release()
        return sink

    for i, (prompt, alpha) in enumerate(jobs):
        n = lengths[i] if lengths else tokens
        engine.submit(Job(engine.tokenizer(prompt)["input_ids"], min(n, tokens), SamplingParams(0.0), [], alpha,
                          sink_for(i)))
    for _ in jobs:
        assert left.acquire(timeout=60)
    assert not errors, errors
    return ["".join(t) for t in texts]
