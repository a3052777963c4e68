"""`libortho serve`: the OpenAI HTTP API driven by the real `openai` client against a tiny random
Llama decomposed by libortho, on 127.0.0.1 (random free port)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import libortho  # noqa: E402
from libortho.cli import main  # noqa: E402
from libortho.serve import server  # noqa: E402
from libortho.serve.config import ServeConfig  # noqa: E402
from libortho.serve.engine import Engine, Job  # noqa: E402
from libortho.serve.keys import KeysError, KeyStore, add_key  # noqa: E402
from libortho.serve.kvbatch import KVBatch  # noqa: E402
from libortho.serve.sampling import SamplingParams  # noqa: E402
from libortho.serve.state import state_of  # noqa: E402
from libortho.serve.text import TextStream  # noqa: E402
from conftest import TEXT, char_tokenizer, tiny_model  # noqa: E402

MODEL = "tiny"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPTS = ["The quick brown", "Python is", "Lists, tuples", "functions are first", "The lazy dog",
           "built-in types", "A programming", "dictionaries"]


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~100x faster than two that
    contend with other processes (measured 0.06 ms vs 17 ms for a [64, 64] x [64, 160] matmul)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A tiny random Llama with a large ortho stream (5 %), so alpha 0 and 1 visibly disagree.

    It has no EOS token: every generation runs to max_tokens (or a stop string), so the tests that
    need a request in flight (drain, disconnect, 429) do not hang on when a random model happens
    to emit EOS. The EOS path has its own test (test_eos_ends_a_row)."""
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = None
    model = tiny_model("llama")
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    libortho.decompose(model, tok, TEXT, libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32,
                                                              ortho_ratio=0.05, method="rtn"), progress=False)
    path = tmp_path_factory.mktemp("serve") / MODEL
    libortho.save(model, tok, path)
    return path


@pytest.fixture(scope="module")
def keys(artifact) -> dict[str, str]:
    path = artifact.parent / "KEYS.json"
    return {"path": str(path), "admin": add_key(path, "admin", 1.0), "public": add_key(path, "public", 0.0),
            "half": add_key(path, "half", 0.5, default_alpha=0.5)}


def start(artifact, keys_path=None, **settings):
    app = server.build(artifact, ServeConfig(keys_path=keys_path, model_name=MODEL, **settings))
    srv, thread, url = server.serve_in_thread(app)
    return srv, thread, url, state_of(app).engine


def stop(srv, thread) -> None:
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def running(artifact, keys, draining_server):  # draining_server: start the subprocess early (see there)
    srv, thread, url, engine = start(artifact, keys["path"], max_batch=8, max_wait_ms=30, max_queue=64)
    yield url, engine
    stop(srv, thread)


def client(url: str, key: str | None) -> "openai.OpenAI":
    # max_retries=0: a 429 or 503 must reach the test, not be retried away
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=60)


def complete(c, prompt: str, alpha: float | None = None, max_tokens: int = 24, **kw) -> str:
    extra = {"alpha": alpha} if alpha is not None else None
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra, **kw)
    return r.choices[0].text


# ---- the API --------------------------------------------------------------------------------------
def test_completions_and_chat_streamed_and_not(running, keys):
    url, _ = running
    c = client(url, keys["admin"])
    raw = c.completions.with_raw_response.create(model=MODEL, prompt="The quick", max_tokens=12, temperature=0,
                                                 extra_body={"alpha": 1.0})
    assert raw.headers["x-libortho-alpha"] == "1"
    full = raw.parse()
    assert full.system_fingerprint == "libortho:alpha=1" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens == len("The quick")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The quick", max_tokens=12, temperature=0, stream=True, extra_body={"alpha": 1.0}))
    assert streamed == full.choices[0].text

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.system_fingerprint == "libortho:alpha=0"
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10
    # the chat template was applied: the prompt is "system: be brief\nuser: hi\nassistant: "
    assert chat.usage.prompt_tokens == len("system: be brief\nuser: hi\nassistant: ")


def test_models_health_metrics(running, keys):
    url, _ = running
    assert [m.id for m in client(url, keys["public"]).models.list()] == [MODEL]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["max_alpha"] == 1.0
    text = httpx.get(url + "/metrics").text
    assert "# TYPE libortho_requests_total counter" in text and "libortho_batch_size_bucket" in text


def test_sampling_is_seeded_and_stops_apply(running, keys):
    url, _ = running
    c = client(url, keys["admin"])
    a, b = (c.completions.create(model=MODEL, prompt="Python", max_tokens=16, temperature=1.0, top_p=0.9,
                                 seed=7).choices[0].text for _ in range(2))
    assert a == b
    greedy = complete(c, "The quick", max_tokens=16)
    stop = greedy[5:7]
    r = c.completions.create(model=MODEL, prompt="The quick", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == greedy[:greedy.index(stop)] and r.choices[0].finish_reason == "stop"


def test_401_without_or_with_unknown_key(running):
    url, _ = running
    for key in ("none", "lo-not-a-key"):
        with pytest.raises(openai.AuthenticationError, match="API key"):
            complete(client(url, key), "x")
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_403_above_the_keys_max_and_400_on_conflicting_alphas(running, keys):
    url, _ = running
    with pytest.raises(openai.PermissionDeniedError, match="up to 0"):
        complete(client(url, keys["public"]), "x", alpha=1.0)
    with pytest.raises(openai.PermissionDeniedError, match="up to 0.5"):
        complete(client(url, keys["half"]), "x", extra_headers={"X-Libortho-Alpha": "0.75"})
    with pytest.raises(openai.BadRequestError, match="disagree"):
        complete(client(url, keys["admin"]), "x", alpha=1.0, extra_headers={"X-Libortho-Alpha": "0"})
    # the header alone works, and the key's default applies when nothing is asked
    r = client(url, keys["admin"]).completions.with_raw_response.create(
        model=MODEL, prompt="x", max_tokens=2, extra_headers={"X-Libortho-Alpha": "0.25"})
    assert r.headers["x-libortho-alpha"] == "0.25"
    assert client(url, keys["half"]).completions.create(model=MODEL, prompt="x", max_tokens=2).system_fingerprint \
        == "libortho:alpha=0.5"


def test_a_max_alpha_zero_key_never_gets_alpha_one_output(running, keys, artifact):
    url, _ = running
    public, admin = client(url, keys["public"]), client(url, keys["admin"])
    model, tok = libortho.load(artifact, alpha=0.0)
    differs = 0
    for prompt in PROMPTS[:4]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with libortho.alpha(model, 0.0), torch.no_grad():  # solo reference, outside the server
            ref0 = tok.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:])
        got = complete(public, prompt)
        assert got == complete(public, prompt, alpha=0.0) == complete(admin, prompt, alpha=0.0) == ref0
        one = complete(admin, prompt, alpha=1.0)
        differs += one != got
        assert got != one or ref0 == one
    assert differs >= 2  # alpha 1 really is different output on this model, so the check above bites


def test_400_errors_are_openai_shaped(running, keys):
    url, _ = running
    h = {"Authorization": f"Bearer {keys['admin']}"}
    post = lambda body, **kw: httpx.post(url + "/v1/completions", headers=h, **kw, **({"json": body} if body is not None else {}))  # noqa: E731
    cases = [
        (post(None, content=b"{not json"), "not valid JSON"),
        (post({"model": MODEL, "prompt": "x", "bogus": 1}), "unknown field 'bogus'"),
        (post({"model": MODEL, "prompt": "x", "max_tokens": "5"}), "max_tokens"),
        (post({"model": MODEL, "prompt": "x", "max_tokens": 0}), "max_tokens"),
        (post({"model": MODEL, "prompt": "x", "max_tokens": 10_000}), "too large"),
        (post({"model": MODEL, "prompt": "x" * 300}), "context"),
        (post({"model": MODEL, "prompt": "x", "n": 2}), "n = 1"),
        (post({"model": MODEL, "prompt": "x", "temperature": 3}), "temperature"),
        (post({"model": MODEL, "prompt": "x", "alpha": "1"}), "alpha"),
        (post({"model": MODEL, "prompt": "x", "alpha": 1.5}), "[0, 1]"),
    ]
    for r, message in cases:
        assert r.status_code == 400, (message, r.text)
        err = r.json()["error"]
        assert message in err["message"] and err["type"] == "invalid_request_error"
    assert post({"model": "other", "prompt": "x"}).status_code == 404
    # unsupported OpenAI fields are accepted and ignored
    r = post({"model": MODEL, "prompt": "x", "max_tokens": 2, "user": "u1", "frequency_penalty": 0.5})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(url + "/health").json()["status"] == "ok"


# ---- batching -------------------------------------------------------------------------------------
def test_per_row_alpha_isolation_is_exact_on_cpu(artifact):
    """Row i's logits depend on alpha_i only: change every neighbour's alpha, row i is bit-identical,
    through a left-padded prefill, decode steps, and a batch joining mid-flight."""
    model, tok = libortho.load(artifact, alpha=0.0)
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    late = [tok(p)["input_ids"] for p in PROMPTS[4:6]]

    def run(alphas: list[float]) -> list[torch.Tensor]:
        a = torch.tensor(alphas)
        batch, logits = KVBatch.prefill(model, prompts, a[:4], tok.pad_token_id)
        out = [logits]
        for step in range(3):
            out.append(batch.step([10 + step] * 4, a[:4]))
        joined, first = KVBatch.prefill(model, late, a[4:], tok.pad_token_id)
        batch.merge(joined)
        out.append(torch.cat([out[-1], first]))
        out.append(batch.step([20] * 6, a))
        batch.keep([5, 0, 2])
        out.append(batch.step([30] * 3, a[[5, 0, 2]]))
        return out

    base = [0.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    ref = run(base)
    for i in range(6):
        changed = [base[j] if j == i else 1.0 - base[j] for j in range(6)]
        other = run(changed)
        for step, (x, y) in enumerate(zip(ref, other)):
            order = list(range(4)) if step < 4 else list(range(6)) if step < 6 else [5, 0, 2]  # rows at this step
            if i in order:
                assert torch.equal(x[order.index(i)], y[order.index(i)]), (i, step)
    assert not torch.equal(ref[0][0], run([1.0] * 6)[0][0])  # and alpha does change row 0


def test_mixed_alpha_batches_against_solo_runs(running, keys):
    url, engine = running
    admin = client(url, keys["admin"])
    jobs = [(p, a) for p in PROMPTS for a in (0.0, 1.0)]
    solo = {(p, a): complete(admin, p, a) for p, a in jobs}  # one at a time: batch of 1
    before = engine.metrics.max_batch_seen
    engine.metrics.max_batch_seen = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = dict(zip(jobs, pool.map(lambda j: complete(admin, *j), jobs)))
    reached = engine.metrics.max_batch_seen
    engine.metrics.max_batch_seen = max(before, reached)
    assert reached >= 4, reached  # the requests really shared batches
    differ = sum(batched[j] != solo[j] for j in jobs)
    print(f"\nmixed-alpha batch vs solo: {differ}/{len(jobs)} greedy continuations differ; max batch {reached}")
    assert differ <= len(jobs) // 4  # batching moves only the last bits of a matmul
    for p in PROMPTS:
        if solo[(p, 0.0)] != solo[(p, 1.0)]:
            assert batched[(p, 0.0)] != solo[(p, 1.0)], p  # never the alpha-1 continuation at alpha 0


def test_a_request_joining_a_running_batch_matches_its_solo_run(artifact):
    """Continuous batching: B joins while A is decoding (cache padded and concatenated mid-flight)."""
    model, tok = libortho.load(artifact, alpha=1.0)
    engine = Engine(model, tok, ServeConfig(max_batch=4, max_wait_ms=0))
    engine.start()
    texts: dict[str, list[str]] = {}
    finished: dict[str, threading.Event] = {}

    def submit(name: str, prompt: str, alpha: float, tokens: int) -> None:
        texts[name], finished[name] = [], threading.Event()

        def sink(event) -> None:
            texts[name].append(event.text)
            if event.kind != "text":
                finished[name].set()

        engine.submit(Job(tok(prompt)["input_ids"], tokens, SamplingParams(0.0), [], alpha, sink))

    try:
        for name, prompt, alpha in (("a_solo", PROMPTS[0], 0.0), ("b_solo", PROMPTS[1], 1.0)):
            submit(name, prompt, alpha, 40 if name == "a_solo" else 20)
            assert finished[name].wait(30)
        submit("a", PROMPTS[0], 0.0, 40)
        deadline = time.monotonic() + 30
        while len(texts["a"]) < 10 and time.monotonic() < deadline:  # A is 10 tokens in
            time.sleep(0.001)
        submit("b", PROMPTS[1], 1.0, 20)
        assert finished["a"].wait(30) and finished["b"].wait(30)
    finally:
        engine.stop()
    assert engine.metrics.max_batch_seen == 2  # B really decoded alongside A
    assert "".join(texts["a"]) == "".join(texts["a_solo"]) and "".join(texts["b"]) == "".join(texts["b_solo"])


def test_eos_ends_a_row(artifact):
    model, tok = libortho.load(artifact, alpha=0.0)
    engine = Engine(model, tok, ServeConfig(max_batch=2, max_wait_ms=0))
    events, done = [], threading.Event()

    def sink(event) -> None:
        events.append(event)
        if event.kind != "text":
            done.set()

    ids = tok("The quick")["input_ids"]
    with torch.no_grad():
        first = int(model(torch.tensor([ids])).logits[0, -1].argmax())  # the greedy first token
    engine.eos_ids = {first}  # declare it EOS: the row must end at once, without its text
    engine.start()
    try:
        engine.submit(Job(ids, 10, SamplingParams(0.0), [], 0.0, sink))
        assert done.wait(30)
    finally:
        engine.stop()
    assert [e.kind for e in events] == ["done"] and events[0].finish_reason == "stop"
    assert events[0].completion_tokens == 1


def _slow_steps(engine, seconds: float, gate: threading.Event | None = None) -> None:
    """Slow the engine's decode steps (and optionally hold them until `gate` is set), to simulate a big model."""
    original = engine._decode_step

    def step():
        if gate is not None:
            gate.wait(30)
        time.sleep(seconds)
        original()

    engine._decode_step = step


def test_429_when_the_queue_is_full(artifact, keys):
    srv, thread, url, engine = start(artifact, keys["path"], max_batch=1, max_wait_ms=0, max_queue=1)
    gate = threading.Event()
    try:
        _slow_steps(engine, 0.0, gate)
        c = client(url, keys["admin"])
        stream = c.completions.create(model=MODEL, prompt="The", max_tokens=4, stream=True)
        first = next(iter(stream))  # the prefill ran: this request holds the only batch slot
        assert first.choices[0].text is not None
        waiting = ThreadPoolExecutor(1).submit(complete, c, "queued", None, 2)
        deadline = time.monotonic() + 10
        while engine.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="too many requests"):
            complete(c, "one too many", max_tokens=2)
        gate.set()
        assert len(list(stream)) >= 1 and len(waiting.result(30)) == 2
    finally:
        gate.set()
        stop(srv, thread)


def test_client_disconnect_mid_stream(running, keys):
    url, engine = running
    original = engine._decode_step
    _slow_steps(engine, 0.02)
    try:
        h = {"Authorization": f"Bearer {keys['admin']}"}
        body = {"model": MODEL, "prompt": "The quick", "max_tokens": 200, "stream": True, "alpha": 1.0}
        with httpx.stream("POST", url + "/v1/completions", headers=h, json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the row leaves the batch long before its 200 tokens (4 s at this pace) would be done
        deadline = time.monotonic() + 2
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.active == 0
    finally:
        engine._decode_step = original
    assert 'status="499"' in httpx.get(url + "/metrics").text
    assert complete(client(url, keys["admin"]), "still alive", max_tokens=3)


# ---- modes without the ortho stream -----------------------------------------------------------------
def test_base_only_mode_without_keys_never_opens_the_ortho_file(artifact, monkeypatch):
    from libortho import artifact as artifact_io

    opened = []
    real = artifact_io._read_tensors
    monkeypatch.setattr(artifact_io, "_read_tensors",
                        lambda folder, name, *rest: (opened.append(name), real(folder, name, *rest))[1])
    srv, thread, url, engine = start(artifact, None)
    try:
        assert opened == ["base.safetensors"]
        c = client(url, None)
        assert c.completions.create(model=MODEL, prompt="x", max_tokens=2).system_fingerprint == "libortho:alpha=0"
        assert complete(c, "x", alpha=0.0, max_tokens=2)
        with pytest.raises(openai.PermissionDeniedError, match="base-only"):
            complete(c, "x", alpha=0.5)
    finally:
        stop(srv, thread)


def test_artifact_without_ortho_serves_alpha_zero_only(artifact, keys, tmp_path):
    base_only = tmp_path / MODEL
    shutil.copytree(artifact, base_only)
    (base_only / "ortho.safetensors").unlink()
    srv, thread, url, engine = start(base_only, keys["path"])
    try:
        half = client(url, keys["half"])  # default_alpha 0.5 is capped at what the server has
        assert half.completions.create(model=MODEL, prompt="x", max_tokens=2).system_fingerprint == "libortho:alpha=0"
        with pytest.raises(openai.PermissionDeniedError, match="no ortho stream"):
            complete(client(url, keys["admin"]), "x", alpha=1.0)
    finally:
        stop(srv, thread)


# ---- keys -----------------------------------------------------------------------------------------
def test_keys_add_prints_only_the_key_and_refuses_duplicates(tmp_path, capsys):
    path = tmp_path / "sub" / "KEYS.json"
    assert main(["keys", "add", str(path), "alice", "--max-alpha", "1", "--default-alpha", "0.5"]) == 0
    out = capsys.readouterr().out
    key = out.strip()
    assert out == key + "\n" and key.startswith("lo-") and key not in path.read_text()
    entry = KeyStore.load(path).lookup(key)
    assert (entry.name, entry.max_alpha, entry.default_alpha) == ("alice", 1.0, 0.5)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert main(["keys", "add", str(path), "alice", "--max-alpha", "0"]) == 2
    assert main(["keys", "add", str(path), "bob", "--max-alpha", "0.2", "--default-alpha", "0.5"]) == 2
    assert "exceeds" in capsys.readouterr().err
    data = json.loads(path.read_text())
    data["keys"][0]["default_alpha"] = 1.0
    data["keys"][0]["max_alpha"] = 0.5
    path.write_text(json.dumps(data))
    with pytest.raises(KeysError, match="exceeds max_alpha"):
        KeyStore.load(path)


def test_a_request_is_authenticated_once(running, keys, monkeypatch):
    from libortho.serve.gate import AlphaGate

    calls = []
    real = AlphaGate.authenticate
    monkeypatch.setattr(AlphaGate, "authenticate", lambda self, header: (calls.append(header), real(self, header))[1])
    url, _ = running
    complete(client(url, keys["half"]), "x", alpha=0.5, max_tokens=2)
    assert len(calls) == 1


# ---- settings -------------------------------------------------------------------------------------
def test_serve_config_fills_defaults_and_names_the_flag_of_a_bad_value(capsys):
    from libortho.serve.config import ServeConfigError

    config = ServeConfig.from_options({"port": 9000, "max_batch": None, "artifact": "x", "func": print})
    assert config.port == 9000 and config.max_batch == ServeConfig().max_batch
    for bad, flag in (({"max_batch": 0}, "--max-batch"), ({"max_wait_ms": float("nan")}, "--max-wait-ms"),
                      ({"port": 70000}, "--port"), ({"max_queue": True}, "--max-queue"), ({"device": "tpu"}, "--device"),
                      ({"host": " "}, "--host")):
        with pytest.raises(ServeConfigError, match=flag):
            ServeConfig(**bad)
    assert main(["serve", "no-such-artifact", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch" in err and ">= 1" in err and "Traceback" not in err


def test_text_stream_holds_back_stop_prefixes(tokenizer):
    ts = TextStream(tokenizer, ["lazy"])
    out = "".join(ts.push(i) for i in tokenizer("the la")["input_ids"])
    assert out == "the "  # "la" might begin "lazy"
    out += "".join(ts.push(i) for i in tokenizer("zy dog")["input_ids"])
    assert out + ts.finish() == "the " and ts.stopped


# ---- shutdown -------------------------------------------------------------------------------------
SLOW_SERVER = """
import sys, time
from libortho.serve import engine
original = engine.Engine._decode_step
def slow(self):
    time.sleep(0.02)  # a bigger model's step time, so the drain has something to wait for
    original(self)
engine.Engine._decode_step = slow
from libortho.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def draining_server(artifact, keys):
    """`libortho serve` in a subprocess with slowed decode steps. Started with the module's first
    server so that its slow start (importing torch and transformers) overlaps the other tests."""
    port = server.free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    log = open(artifact.parent / "drain.log", "w")  # a file, not a pipe nobody reads (it could fill)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, "serve", str(artifact), "--port", str(port),
                             "--keys", keys["path"], "--model-name", MODEL, "--log-level", "warning", "--threads", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, f"http://127.0.0.1:{port}"
    log.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_drains_in_flight_and_refuses_new(draining_server, keys):
    proc, url = draining_server
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None, (Path(keys["path"]).parent / "drain.log").read_text()
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.1)
    c = client(url, keys["admin"])
    stream = iter(c.completions.create(model=MODEL, prompt="The", max_tokens=80, temperature=0, stream=True))
    text = next(stream).choices[0].text
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(openai.InternalServerError) as refused:
        complete(c, "too late", max_tokens=2)
    assert refused.value.status_code == 503
    assert httpx.get(url + "/health").status_code == 503
    chunks = list(stream)
    text += "".join(ch.choices[0].text for ch in chunks)
    assert chunks[-1].choices[0].finish_reason == "length" and len(text) == 80  # one char per token
    assert proc.wait(30) == 0


# ---- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path):
    from libortho import sources

    model, tok = sources.load_model(None)
    libortho.decompose(model, tok, TEXT, libortho.OrthoConfig(calib_tokens=1024, seq_len=256, method="rtn"), progress=False)
    path = tmp_path / "smol"
    libortho.save(model, tok, path)
    keys_path = tmp_path / "KEYS.json"
    admin, public = add_key(keys_path, "admin", 1.0), add_key(keys_path, "public", 0.0)
    srv, thread, url, _ = start(path, keys_path, max_batch=8)
    try:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        one = client(url, admin).chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                          extra_body={"alpha": 1.0})
        zero = client(url, public).chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
        assert one.choices[0].message.content and zero.system_fingerprint == "libortho:alpha=0"
        with pytest.raises(openai.PermissionDeniedError):
            complete(client(url, public), "x", alpha=1.0)
    finally:
        stop(srv, thread)
