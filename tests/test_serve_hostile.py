"""Hostile clients against `libortho serve` (tiny random Llama, 127.0.0.1).

One table of server cases: each is sent while normal requests (alphas 0 and 1) decode, and must get
its status with one line of message, leave no traceback in the server's log, and leave the normal
requests their 200 and their solo text. One table of command-line cases: exit code and one line.
Plus: /health stays responsive during maximum-size requests, KEYS.json changes reach a running
server (poll and SIGHUP), and a second SIGTERM does not pass for a clean exit."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import libortho  # noqa: E402
from libortho.cli import main  # noqa: E402
from libortho.serve import engine as engine_module  # noqa: E402
from libortho.serve import server  # noqa: E402
from libortho.serve.config import ServeConfig  # noqa: E402
from libortho.serve.keys import add_key  # noqa: E402
from libortho.serve.sampling import RowFailed, SamplingParams, sample  # noqa: E402
from libortho.serve.state import state_of  # noqa: E402
from libortho.serve.text import TextStream  # noqa: E402
from conftest import TEXT, char_tokenizer, tiny_model  # noqa: E402

MODEL = "tiny"
CONTEXT = 256  # tiny_model's max_position_embeddings
LIMITS = ServeConfig()
MAX_PROMPT_CHARS = LIMITS.prompt_chars_per_token * CONTEXT
# the developer role is refused by the template itself, as some real templates refuse system messages
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'developer' %}"
                 "{{ raise_exception('developer messages are not supported') }}{% endif %}"
                 "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
BROKEN_TEMPLATE = "{{ raise_exception('this template is broken') }}"
NORMAL = [("The quick brown", 0.0), ("The quick brown", 1.0), ("Python is", 0.0), ("Python is", 1.0)]
NORMAL_TOKENS = 64
STEP_DELAY_S = 0.004  # per decode step: keeps the normal requests in flight while a hostile one arrives
POISON_TEMPERATURE = 0.777  # rows sampled at this temperature get all-NaN logits (a model that breaks for one row)


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on shared cores: one thread is far faster
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama saved twice: with a working chat template, and with one that always fails.
    No EOS, so every generation runs to max_tokens."""
    tok = char_tokenizer()
    tok.eos_token = None
    model = tiny_model("llama")
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    libortho.decompose(model, tok, TEXT, libortho.OrthoConfig(calib_tokens=512, seq_len=128, group_size=32,
                                                              ortho_ratio=0.05, method="rtn"), progress=False)
    root = tmp_path_factory.mktemp("hostile_serve")
    paths = {}
    for name, template in (("good", CHAT_TEMPLATE), ("broken", BROKEN_TEMPLATE)):
        tok.chat_template = template
        paths[name] = root / name / MODEL
        libortho.save(model, tok, paths[name])
    return paths


@pytest.fixture(scope="module")
def keys(artifacts) -> dict[str, str]:
    path = artifacts["good"].parents[1] / "KEYS.json"
    names = {"admin": (1.0, 0.0), "half": (0.5, 0.5), "doomed": (1.0, 0.0), "lowered": (1.0, 0.0)}
    return {"path": str(path), **{name: add_key(path, name, *alphas) for name, alphas in names.items()}}


class LogTap(logging.Handler):
    """Every log record of the server (libortho's and uvicorn's), for checking there is no traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self, since: int) -> list[str]:
        return [r.getMessage() for r in self.records[since:] if r.exc_info or "Traceback" in r.getMessage()]

    def messages(self, since: int = 0) -> list[str]:
        return [r.getMessage() for r in self.records[since:]]


@dataclass
class Server:
    url: str
    engine: engine_module.Engine
    keys: dict[str, str]
    tap: LogTap
    solo: dict[tuple[str, float], str]  # the normal requests' text, each run alone


@pytest.fixture(scope="module")
def hostile_server(artifacts, keys, signalled_server) -> Iterator[Server]:  # signalled_server: start it early
    app = server.build(artifacts["good"], ServeConfig(keys_path=keys["path"], model_name=MODEL, max_batch=16,
                                                      max_wait_ms=5))
    srv, thread, url = server.serve_in_thread(app)
    engine = state_of(app).engine
    tap = LogTap()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("libortho.serve")]
    level = loggers[2].level
    loggers[2].setLevel(logging.INFO)
    for lg in loggers[:2]:  # uvicorn's logger does not propagate to the root
        lg.addHandler(tap)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "sample", _poisoning(engine_module.sample))
        solo = {(p, a): _normal(url, keys["admin"], p, a) for p, a in NORMAL}
        _slow_steps(engine, STEP_DELAY_S)
        yield Server(url, engine, keys, tap, solo)
    for lg in loggers[:2]:
        lg.removeHandler(tap)
    loggers[2].setLevel(level)
    srv.should_exit = True
    thread.join(30)


def _poisoning(real_sample: Callable) -> Callable:
    """`sample` that gives rows at POISON_TEMPERATURE all-NaN logits first."""

    def poisoned(logits: torch.Tensor, params: list[SamplingParams]) -> list:
        rows = [i for i, p in enumerate(params) if p.temperature == POISON_TEMPERATURE]
        if rows:
            logits = logits.clone()
            logits[rows] = float("nan")
        return real_sample(logits, params)

    return poisoned


def _slow_steps(engine, seconds: float) -> None:
    original = engine._decode_step

    def step() -> None:
        time.sleep(seconds)
        original()

    engine._decode_step = step


def _normal(url: str, key: str, prompt: str, alpha: float) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NORMAL_TOKENS, "temperature": 0, "alpha": alpha}
    r = httpx.post(url + "/v1/completions", headers=_auth(key), json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.01) -> float:
    """Seconds until `condition()` held; AssertionError after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(every_s)
    return time.monotonic() - start


# ---- how a case talks to the server -----------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    status: int
    message: str = ""  # the error's message ("" for a success)
    body: dict | None = None


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "The lazy", "max_tokens": 4, **fields}


def chat(messages: list[dict], **fields) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **fields}


def answer_of(r: httpx.Response) -> Answer:
    body = r.json() if r.content else None
    if r.status_code == 200:
        return Answer(200, "", body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body  # OpenAI's shape
    return Answer(r.status_code, error["message"], body)


def encoded(body: dict) -> bytes:
    """The body as sent (httpx's own `json=` encoding is more compact, which would change sizes)."""
    return json.dumps(body).encode()


def post(body: dict | None = None, *, content: bytes | Iterator[bytes] | None = None, key: str = "admin",
         path: str = "/v1/completions") -> Callable[[Server], Answer]:
    def send(s: Server) -> Answer:
        headers = {**_auth(s.keys[key]), "Content-Type": "application/json"}
        data = encoded(body) if body is not None else content
        return answer_of(httpx.post(s.url + path, headers=headers, content=data, timeout=60))

    return send


def streamed(body: dict) -> Callable[[Server], Answer]:
    def send(s: Server) -> Answer:
        with httpx.stream("POST", s.url + "/v1/completions", headers=_auth(s.keys["admin"]),
                          json={**body, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        errors = [json.loads(e)["error"]["message"] for e in events[:-1] if '"error"' in e]
        assert events[-1] == "[DONE]", events
        return Answer(500 if errors else r.status_code, errors[0] if errors else "")

    return send


def chunked(body: dict) -> Iterator[bytes]:
    """The body in 64 KiB pieces: httpx sends an iterator with Transfer-Encoding: chunked, no Content-Length."""
    data = json.dumps(body).encode()
    for i in range(0, len(data), 65536):
        yield data[i:i + 65536]


def statuses(s: Server, status: int) -> int:
    """How many requests the metrics counted with this status."""
    text = httpx.get(s.url + "/metrics").text
    return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("libortho_requests_total{") and f'status="{status}"' in line)


def disconnect_before_the_answer(s: Server) -> Answer:
    """A non-streaming request whose client gives up: it must be counted 499 and its work stopped."""
    before = statuses(s, 499)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/completions", headers=_auth(s.keys["admin"]), json=completion(max_tokens=240),
                   timeout=httpx.Timeout(30, read=0.2))
    wait_until(lambda: statuses(s, 499) > before, 5)
    # 240 tokens at >= STEP_DELAY_S a step take about a second: the row left long before
    wait_until(lambda: all(r.job.max_tokens != 240 for r in list(s.engine._rows)), 1)
    return Answer(499)


def labels_are_rounded(s: Server) -> None:
    text = httpx.get(s.url + "/metrics").text
    assert 'alpha="0.1"' in text and "0.123456" not in text
    labels = {part.split('"')[1] for part in text.split("alpha=")[1:]}
    assert labels <= {"none", "0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1"}, labels


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Server], Answer]
    status: int
    phrase: str = ""  # must be in the error's message
    param: str | None = None  # when given, the error's param
    then: Callable[[Server], None] | None = None  # a further check after the answer


DEEP = "[" * 100_000 + "]" * 100_000
TOO_DEEP_FOR_PYTHON = "[" * 5_000 + "]" * 5_000  # past the recursion limit, within the JSON-values limit
ONE_PAST_THE_CHAR_LIMIT = "x" * (MAX_PROMPT_CHARS + 1)

SERVER_CASES = [
    Case("temperature 1e-300 is greedy", post(completion(temperature=1e-300)), 200),
    Case("temperature 5e-324 is greedy", post(completion(temperature=5e-324)), 200),
    Case("temperature 1e-45 is greedy, streamed", streamed(completion(temperature=1e-45)), 200),
    Case("all-NaN logits fail that row alone", post(completion(temperature=POISON_TEMPERATURE)), 500,
         "no finite logit"),
    Case("prompt of 5 MiB, Content-Length", post(completion(prompt="p" * (5 << 20))), 413, "larger than 4194304 bytes"),
    Case("body of 5 MiB chunked", post(content=chunked(completion(user="u" * (5 << 20)))), 413,
         "larger than 4194304 bytes"),
    Case("200k chat messages", post(chat([{"role": "user", "content": ""}] * 200_000), path="/v1/chat/completions"),
         413, "larger than 4194304 bytes"),
    Case("120k chat messages in 3.9 MB", post(chat([{"role": "user", "content": ""}] * 120_000),
                                              path="/v1/chat/completions"), 400, "JSON values"),
    Case("1.3 million JSON numbers in 3.9 MB", post(completion(user=[0] * 1_300_000)), 400, "JSON values"),
    Case("prompt past 16 characters per context token", post(completion(prompt=ONE_PAST_THE_CHAR_LIMIT)), 400,
         "at most 4096 characters", "prompt"),
    Case("prompt past the context in tokens", post(completion(prompt="x" * 300)), 400, "300 tokens", "prompt"),
    Case("chat past 16 characters per context token",
         post(chat([{"role": "user", "content": ONE_PAST_THE_CHAR_LIMIT}]), path="/v1/chat/completions"), 400,
         "at most 4096 characters", "messages"),
    Case("chat past the context in tokens", post(chat([{"role": "user", "content": "x" * 300}]),
                                                  path="/v1/chat/completions"), 400, "tokens", "messages"),
    Case("257 chat messages", post(chat([{"role": "user", "content": "hi"}] * 257), path="/v1/chat/completions"),
         400, "at most 256 messages", "messages"),
    Case("5 stop strings", post(completion(stop=list("abcde"))), 400, "at most 4 stop sequences", "stop"),
    Case("stop string of 257 characters", post(completion(stop="s" * 257)), 400, "at most 256 characters", "stop"),
    Case("max_tokens past the context left", post(completion(max_tokens=CONTEXT)), 400, "too large", "max_tokens"),
    Case("max_tokens 10**30", post(completion(max_tokens=10**30)), 400, "too large", "max_tokens"),
    Case("JSON nested 100k deep", post(content=('{"model": "tiny", "prompt": "x", "user": ' + DEEP + "}").encode()),
         400, "JSON"),
    Case("JSON nested past the recursion limit",
         post(content=('{"model": "tiny", "prompt": "x", "user": ' + TOO_DEEP_FOR_PYTHON + "}").encode()), 400,
         "nested too deeply"),
    Case("seed of 5000 digits", post(content=b'{"model": "tiny", "prompt": "x", "seed": ' + b"7" * 5000 + b"}"), 400,
         "too many digits"),
    Case("lone surrogate in the prompt", post(content=b'{"model": "tiny", "prompt": "ab\\ud800cd"}'), 400,
         "lone surrogate", "prompt"),
    Case("lone surrogate in a chat message", post(content=b'{"model": "tiny", "messages": [{"role": "user", '
                                                          b'"content": "\\udfff"}]}', path="/v1/chat/completions"),
         400, "lone surrogate", "messages"),
    Case("body not UTF-8", post(content=b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400, "not UTF-8"),
    Case("seed 2**70", post(completion(seed=2**70, temperature=1.0)), 200),
    Case("seed -2**70", post(completion(seed=-2**70, temperature=1.0)), 200),
    Case("alpha 0.50000001 on a max-0.5 key", post(completion(alpha=0.50000001), key="half"), 403,
         "alpha 0.50000001 refused", "alpha"),
    Case("chat template refuses the conversation",
         post(chat([{"role": "developer", "content": "hi"}]), path="/v1/chat/completions"), 400,
         "developer messages are not supported", "messages"),
    Case("alpha 0.123456 is labelled 0.1 in the metrics", post(completion(alpha=0.123456)), 200,
         then=labels_are_rounded),
    Case("client gone before a non-streamed answer", disconnect_before_the_answer, 499),
]


# ---- the server's table -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", SERVER_CASES, ids=[c.name for c in SERVER_CASES])
def test_hostile_request_beside_normal_ones(case: Case, hostile_server: Server):
    s = hostile_server
    mark = len(s.tap.records)
    with ThreadPoolExecutor(len(NORMAL)) as pool:
        normal = {job: pool.submit(_normal, s.url, s.keys["admin"], *job) for job in NORMAL}
        wait_until(lambda: s.engine.active >= len(NORMAL), 10, 0.002)  # all decoding now
        got = case.send(s)
        texts = {job: f.result(60) for job, f in normal.items()}
    print(f"\n{case.name}: {got.status} {got.message}")
    assert got.status == case.status, got
    assert case.phrase in got.message and "\n" not in got.message, got
    if case.param is not None:
        assert got.body["error"]["param"] == case.param, got
    if case.then is not None:
        case.then(s)
    assert texts == s.solo  # the normal requests were not disturbed
    assert s.tap.tracebacks(mark) == []


def test_the_server_table_covers_every_case():
    assert len(SERVER_CASES) == 30


def test_health_stays_responsive_during_maximum_size_requests(hostile_server: Server):
    """Bodies just under max_body_bytes, of the two costly kinds: the longest prompt that passes the
    character check with a huge ignored field, and the most JSON values allowed."""
    s = hostile_server
    bodies = [filled(completion(prompt="The lazy dog " * (MAX_PROMPT_CHARS // 13)), "user"),
              filled(completion(user=[0] * (LIMITS.max_json_values - 100)), "logit_bias")]
    assert all(len(b) == LIMITS.max_body_bytes for b in bodies)
    done = threading.Event()
    answers: list[int] = []

    def hammer() -> None:
        with httpx.Client(headers={**_auth(s.keys["admin"]), "Content-Type": "application/json"}, timeout=60) as c:
            while not done.is_set():
                for body in bodies:
                    answers.append(c.post(s.url + "/v1/completions", content=body).status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    latencies = []
    try:
        with httpx.Client(timeout=30) as c:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline or len(answers) < 4:
                start = time.monotonic()
                assert c.get(s.url + "/health").status_code == 200
                latencies.append(time.monotonic() - start)
                time.sleep(0.01)
    finally:
        done.set()
        worker.join(60)
    latencies.sort()
    median_ms, max_ms = latencies[len(latencies) // 2] * 1000, latencies[-1] * 1000
    print(f"\n/health during {len(answers)} maximum-size requests: median {median_ms:.1f} ms, max {max_ms:.1f} ms "
          f"over {len(latencies)} probes")
    # the longest prompt is refused after tokenizing (one token per character is past the context); the
    # body of many values is served
    assert set(answers) == {200, 400}
    assert latencies[-1] < 1.0


def filled(body: dict, field: str) -> bytes:
    """The body grown to exactly max_body_bytes by a string in `field` (an accepted, ignored one)."""
    room = LIMITS.max_body_bytes - len(encoded({**body, field: ""}))
    return encoded({**body, field: "f" * room})


def test_a_revoked_key_is_refused_within_a_second_without_a_restart(hostile_server: Server, capsys):
    s = hostile_server
    doomed = post(completion(max_tokens=1), key="doomed")
    assert doomed(s).status == 200
    assert main(["keys", "revoke", s.keys["path"], "doomed"]) == 0
    delay = wait_until(lambda: doomed(s).status == 401, 5, 0.02)
    refused = doomed(s)
    print(f"\nrevoked key refused {delay:.2f} s after `keys revoke`")
    assert refused.status == 401 and refused.message == "invalid API key"  # like any unknown key
    assert delay < 2.5  # polled every keys_poll_s (1 s)
    # lowering max_alpha applies the same way
    lowered = post(completion(max_tokens=1, alpha=1.0), key="lowered")
    assert lowered(s).status == 200
    assert main(["keys", "set", s.keys["path"], "lowered", "--max-alpha", "0.25"]) == 0
    wait_until(lambda: lowered(s).status == 403, 5, 0.02)
    assert "up to 0.25" in lowered(s).message
    assert s.tap.tracebacks(0) == []


def test_an_invalid_or_untrusted_keys_file_keeps_the_keys_in_use(hostile_server: Server):
    s = hostile_server
    path = Path(s.keys["path"])
    good = path.read_bytes()
    admin = post(completion(max_tokens=1))
    try:
        for spoil, why in ((lambda: path.write_text("{not json"), "not valid JSON"),
                           (lambda: (path.write_bytes(good), path.chmod(0o666)), "writable by every user"),
                           (lambda: path.unlink(), "does not exist")):
            mark = len(s.tap.records)
            spoil()
            wait_until(lambda: any("keys not reloaded" in m for m in s.tap.messages(mark)), 5)
            errors = [m for m in s.tap.messages(mark) if "keys not reloaded" in m]
            assert len(errors) == 1 and why in errors[0] and "\n" not in errors[0], errors
            assert admin(s).status == 200
    finally:
        path.write_bytes(good)
        path.chmod(0o600)
    mark = len(s.tap.records)
    wait_until(lambda: any("keys reloaded" in m for m in s.tap.messages(mark)), 5)


def test_a_failing_chat_template_refuses_chat_and_is_logged_once(artifacts, hostile_server):
    tap = hostile_server.tap  # already listening
    mark = len(tap.records)
    app = server.build(artifacts["broken"], ServeConfig(model_name=MODEL))
    srv, thread, url = server.serve_in_thread(app)
    try:
        r = httpx.post(url + "/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]), timeout=30)
        again = httpx.post(url + "/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}]), timeout=30)
        ok = httpx.post(url + "/v1/completions", json=completion(), timeout=30)
    finally:
        srv.should_exit = True
        thread.join(30)
    message = answer_of(r).message
    assert r.status_code == again.status_code == 400 and "this template is broken" in message and "\n" not in message
    assert ok.status_code == 200
    warned = [m for m in tap.messages(mark) if "template" in m]
    assert len(warned) == 1 and "this template is broken" in warned[0]
    assert tap.tracebacks(mark) == []


# ---- sampling and text, without HTTP ----------------------------------------------------------------
def test_sampling_sanitises_each_row_and_fails_only_the_broken_one():
    logits = torch.randn(5, 12)
    logits[1] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :6] = float("nan")
    for temperatures in ([1e-300, 5e-324, 1.0, 1e-45, 0.7], [0.0] * 5, [1.0] * 5):
        tokens = sample(logits, [SamplingParams(t, top_p=0.9, seed=1) for t in temperatures])
        assert isinstance(tokens[1], RowFailed) and "no finite logit" in tokens[1].reason
        assert tokens[2] == 7 and all(isinstance(t, int) for i, t in enumerate(tokens) if i != 1)
        assert 6 <= tokens[3] < 12  # NaN is never chosen


def test_stop_matching_is_exact_and_linear(tokenizer):
    import random

    rng = random.Random(0)

    def reference(text: str, stops: list[str]) -> str:  # the first stop string to be complete cuts the text
        for end in range(1, len(text) + 1):
            starts = [end - len(s) for s in stops if text[:end].endswith(s)]
            if starts:
                return text[:min(starts)]
        return text

    for _ in range(300):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        ts = TextStream(tokenizer, stops)
        assert "".join(ts.push(i) for i in tokenizer(text)["input_ids"]) + ts.finish() == reference(text, stops)
    ts = TextStream(tokenizer, ["a" * (LIMITS.max_stop_chars - 1) + "b"] * LIMITS.max_stops)
    ids = tokenizer("a" * 2000)["input_ids"]
    start = time.perf_counter()
    for i in ids:
        ts.push(i)
    per_token = (time.perf_counter() - start) / len(ids)
    print(f"\nstop matching, 4 stops of 256 characters: {per_token * 1e6:.0f} us per token")
    assert ts.released == 2000 - (LIMITS.max_stop_chars - 1)  # the tail that may still become a stop is held
    assert per_token < 0.002


# ---- the command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_files(artifacts, keys, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hostile_cli")
    good = Path(keys["path"]).read_bytes()
    paths = {}
    for name, mode in (("world_writable", 0o666), ("foreign", 0o600), ("corrupt", 0o600), ("ok", 0o600)):
        paths[name] = root / f"{name}.json"
        paths[name].write_bytes(good if name != "corrupt" else b"[" * 100_000)
        paths[name].chmod(mode)
    if os.getuid() == 0:
        os.chown(paths["foreign"], 65534, 65534)
    return {name: str(p) for name, p in paths.items()}


def cli_cases(art: str, f: dict[str, str]) -> list[tuple[str, list[str], int, str]]:
    """(name, argv, exit code, a phrase the one line of stderr must hold)."""
    return [
        ("serve --port 70000", ["serve", art, "--port", "70000"], 2, "port (--port) must be a whole number from 1"),
        ("serve --device cuda without CUDA", ["serve", art, "--device", "cuda"], 2, "cuda is not available"),
        ("serve without the serve extra", ["serve", art], 2, "pip install 'libortho[serve]'"),
        ("serve with a world-writable KEYS.json", ["serve", art, "--keys", f["world_writable"]], 2,
         "writable by every user"),
        ("serve with a foreign-owned KEYS.json", ["serve", art, "--keys", f["foreign"]], 2, "belongs to uid"),
        ("serve with KEYS.json nested 100k deep", ["serve", art, "--keys", f["corrupt"]], 2, "nested too deeply"),
        ("keys add with a newline in the name", ["keys", "add", f["ok"], "eve\nadmin", "--max-alpha", "1"], 2,
         "1 to 64 characters"),
        ("keys revoke an unknown name", ["keys", "revoke", f["ok"], "nobody"], 2, "no key named 'nobody'"),
        ("keys set without a change", ["keys", "set", f["ok"], "admin"], 2, "nothing to change"),
        ("keys set max below the default", ["keys", "set", f["ok"], "half", "--max-alpha", "0.25"], 2,
         "pass --default-alpha too"),
        ("keys list of a world-writable file", ["keys", "list", f["world_writable"]], 2, "chmod 600"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_hostile_command_line_is_one_line_and_exit_2(index, artifacts, cli_files, capsys, monkeypatch):
    name, argv, code, phrase = cli_cases(str(artifacts["good"]), cli_files)[index]
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if "foreign" in name and os.getuid() != 0:
        monkeypatch.setattr(os, "getuid", lambda: 12345)  # the file is then another user's
    if "extra" in name:
        monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ModuleNotFoundError
    loads = []
    monkeypatch.setattr(server, "load_for_serving", lambda *a: loads.append(a) or pytest.fail("the model loaded"))
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        got = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("usage:")
           and not line.startswith(" ")]
    print(f"\n{name}: exit {got}: {err}")
    assert got == code and len(err) == 1 and phrase in err[0] and "Traceback" not in err[0], (name, got, err)
    assert loads == []  # refused before the model loads


def test_the_command_line_table_covers_every_case(artifacts, cli_files):
    assert len(cli_cases(str(artifacts["good"]), cli_files)) == 11


def test_keys_list_set_revoke_through_a_symlink(tmp_path, capsys):
    real = tmp_path / "secrets" / "KEYS.json"
    link = tmp_path / "KEYS.json"
    add_key(real, "alice", 1.0)
    link.symlink_to(real)
    assert main(["keys", "add", str(link), "bob", "--max-alpha", "0.5"]) == 0
    assert main(["keys", "set", str(link), "bob", "--max-alpha", "0.75", "--default-alpha", "0.25"]) == 0
    assert main(["keys", "revoke", str(link), "alice"]) == 0
    capsys.readouterr()
    assert main(["keys", "list", str(link)]) == 0
    assert capsys.readouterr().out == "bob\tmax_alpha=0.75\tdefault_alpha=0.25\n"
    assert link.is_symlink() and link.resolve() == real.resolve()  # the link kept, its target written
    assert sorted(p.name for p in real.parent.iterdir()) == ["KEYS.json"]  # no temporary file left
    assert oct(real.stat().st_mode & 0o777) == "0o600"


# ---- signals, in a real `libortho serve` process ------------------------------------------------------
SIGNALLED_SERVER = """
import sys, time
from libortho.serve import config, engine
original = engine.Engine._decode_step
def slow(self):
    time.sleep(0.02)  # a bigger model's step time, so that a request is in flight when the signals come
    original(self)
engine.Engine._decode_step = slow
# polling KEYS.json off: only SIGHUP can make this server re-read it
real_from_options = config.ServeConfig.from_options.__func__
config.ServeConfig.from_options = classmethod(lambda cls, options: real_from_options(cls, {**options,
                                                                                          "keys_poll_s": 3600}))
from libortho.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def signalled_server(artifacts, tmp_path_factory):
    """`libortho serve` in a subprocess, started with the module's first server so that its slow start
    (importing torch) overlaps the other tests."""
    root = tmp_path_factory.mktemp("signalled")
    keys_path = root / "KEYS.json"
    keys = {"path": str(keys_path), "admin": add_key(keys_path, "admin", 1.0), "hup": add_key(keys_path, "hup", 1.0)}
    port = server.free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED_SERVER, "serve", str(artifacts["good"]), "--port", str(port),
                             "--keys", str(keys_path), "--model-name", MODEL, "--threads", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, f"http://127.0.0.1:{port}", keys, root / "serve.log"
    log.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sighup_reloads_keys_and_a_second_sigterm_exits_non_zero(signalled_server):
    proc, url, keys, log = signalled_server

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 90, 0.1)
    def hup() -> int:
        return httpx.post(url + "/v1/completions", headers=_auth(keys["hup"]), json=completion(max_tokens=1),
                          timeout=30).status_code

    assert hup() == 200
    assert main(["keys", "revoke", keys["path"], "hup"]) == 0
    time.sleep(0.3)
    assert hup() == 200  # polling is off in this server: nothing re-read the file yet
    proc.send_signal(signal.SIGHUP)
    delay = wait_until(lambda: hup() == 401, 5, 0.02)
    print(f"\nrevoked key refused {delay:.2f} s after SIGHUP")

    body = completion(prompt="The", max_tokens=200, stream=True)  # 200 steps of 20 ms: in flight for 4 s
    with httpx.stream("POST", url + "/v1/completions", headers=_auth(keys["admin"]), json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text  # cut short: never the 0 of a full drain
    assert "keys reloaded" in text and "Traceback" not in text, text
    assert "exiting now with status 143, cutting off 1 requests in flight" in text, text
