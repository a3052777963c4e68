"""`libortho serve --upstream`: libortho's keys, alpha gate, limits and metrics in front of a stub
OpenAI-compatible engine (a small FastAPI app on 127.0.0.1) that records what it is sent."""
from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from libortho.cli import main
from libortho.serve import server
from libortho.serve.config import ServeConfig, ServeConfigError
from libortho.serve.gateway import build_gateway
from libortho.serve.keys import add_key

MODEL = "tiny"  # the id clients send
BASE = "tiny-base"  # the upstream's base model (alpha 0)
ADAPTER = "tiny-private"  # the upstream's LoRA adapter (alpha 1)
FAIL = "make the upstream fail"  # a prompt the stub answers with 500


# ---- the stub upstream ----------------------------------------------------------------------------
def stub_app(seen: list[dict]) -> FastAPI:
    """An OpenAI-compatible engine that records each body and answers with the model it was asked for."""
    app = FastAPI()

    async def answer(request: Request, chat: bool):
        body = await request.json()
        seen.append(body)
        if FAIL in json.dumps(body):
            return JSONResponse({"error": {"message": "CUDA out of memory\nin the stub", "type": "server_error"}},
                                status_code=500)
        text = f"served by {body['model']}"
        kind = "chat.completion" if chat else "text_completion"
        envelope = {"id": "x-1", "created": 1, "model": body["model"]}
        if body.get("stream"):
            def chunks():
                for word in text.split(" "):
                    piece = word + " "
                    choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                              else {"index": 0, "text": piece, "finish_reason": None})
                    yield f"data: {json.dumps({**envelope, 'object': kind + ('.chunk' if chat else ''), 'choices': [choice]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(chunks(), media_type="text/event-stream")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": text, "finish_reason": "stop"})
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        return JSONResponse({**envelope, "object": kind, "choices": [choice], "usage": usage})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, chat=True)

    return app


@pytest.fixture(scope="module")
def upstream():
    """(base URL, the bodies the stub received)."""
    seen: list[dict] = []
    port = server.free_port("127.0.0.1")
    srv = uvicorn.Server(uvicorn.Config(stub_app(seen), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the stub upstream did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", seen
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("gateway") / "KEYS.json"
    return {"path": str(path), "admin": add_key(path, "admin", 1.0), "public": add_key(path, "public", 0.0),
            "half": add_key(path, "half", 0.5, default_alpha=0.5)}


def start_gateway(upstream_url: str, keys_path: str | None, **settings):
    app = build_gateway(ServeConfig(upstream=upstream_url, keys_path=keys_path, model_name=MODEL, **settings))
    return server.serve_in_thread(app)


@pytest.fixture(scope="module")
def gateway(upstream, keys):
    srv, thread, url = start_gateway(upstream[0], keys["path"], upstream_model=BASE, upstream_adapter=ADAPTER)
    yield url
    srv.should_exit = True
    thread.join(30)


@pytest.fixture
def seen(upstream) -> list[dict]:
    """The stub's record, emptied for this test."""
    upstream[1].clear()
    return upstream[1]


def client(url: str, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=30)


def post(url: str, key: str | None, body: dict, path: str = "/v1/completions") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json={"model": MODEL, **body}, headers=headers, timeout=30)


# ---- tests ----------------------------------------------------------------------------------------
def test_alpha_zero_goes_to_the_base_and_alpha_one_to_the_adapter(gateway, keys, seen):
    public, admin = client(gateway, keys["public"]), client(gateway, keys["admin"])
    r = public.completions.create(model=MODEL, prompt="Hi", max_tokens=5, extra_body={"logprobs": 2})
    assert r.choices[0].text == f"served by {BASE}" and r.usage.completion_tokens == 4
    raw = admin.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                          extra_body={"alpha": 1})
    assert raw.headers["x-libortho-alpha"] == "1"
    assert raw.parse().choices[0].message.content == f"served by {ADAPTER}"
    r = admin.completions.create(model=MODEL, prompt="Hi")  # the admin key's default alpha is 0
    assert r.choices[0].text == f"served by {BASE}"
    assert [b["model"] for b in seen] == [BASE, ADAPTER, BASE]
    assert all("alpha" not in b for b in seen)  # libortho's own field stays here
    assert seen[0]["logprobs"] == 2 and seen[0]["max_tokens"] == 5  # everything else goes on as sent
    metrics = httpx.get(gateway + "/metrics").text
    assert 'libortho_requests_total{alpha="1",endpoint="chat",status="200"} 1' in metrics
    assert 'libortho_completion_tokens_total{alpha="0"} 8' in metrics


def test_streaming_passes_through(gateway, keys, seen):
    admin = client(gateway, keys["admin"])
    parts = [c.choices[0].delta.content or "" for c in admin.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True, extra_body={"alpha": 1.0})]
    assert "".join(parts) == f"served by {ADAPTER} "
    parts = [c.choices[0].text for c in client(gateway, keys["public"]).completions.create(
        model=MODEL, prompt="Hi", stream=True)]
    assert "".join(parts) == f"served by {BASE} "
    assert [(b["model"], b["stream"]) for b in seen] == [(ADAPTER, True), (BASE, True)]


def test_fractional_alpha_is_400_and_nothing_is_forwarded(gateway, keys, seen):
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway, keys["admin"]).completions.create(model=MODEL, prompt="Hi", extra_body={"alpha": 0.5})
    assert "only alpha 0" in str(err.value) and "upstream" in str(err.value)
    r = post(gateway, keys["half"], {"prompt": "Hi"})  # a default alpha of 0.5 cannot be forwarded either
    assert r.status_code == 400 and r.json()["error"]["param"] == "alpha"
    assert seen == []


def test_gate_refusals_forward_nothing(gateway, keys, seen):
    r = post(gateway, keys["public"], {"prompt": "Hi", "alpha": 1})
    assert r.status_code == 403 and "'public' may use alpha up to 0" in r.json()["error"]["message"]
    assert post(gateway, None, {"prompt": "Hi"}).status_code == 401
    assert post(gateway, "not-a-key", {"prompt": "Hi"}).status_code == 401
    r = post(gateway, keys["admin"], {"prompt": "Hi", "model": "other"})
    assert r.status_code == 404 and "'tiny'" in r.json()["error"]["message"]
    r = httpx.post(gateway + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {keys['admin']}"})
    assert r.status_code == 400
    r = post(gateway, keys["admin"], {"prompt": "x" * (ServeConfig().max_body_bytes + 1)})
    assert r.status_code == 413
    assert seen == []


def test_an_upstream_error_is_502_naming_the_upstream(gateway, upstream, keys, seen):
    r = post(gateway, keys["admin"], {"prompt": FAIL})
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    assert upstream[0] in message and "500" in message and "CUDA out of memory in the stub" in message
    assert "\n" not in message and "Traceback" not in r.text
    r = post(gateway, keys["admin"], {"prompt": FAIL, "stream": True})  # streamed: refused before any event
    assert r.status_code == 502
    assert post(gateway, keys["admin"], {"prompt": "Hi"}).status_code == 200  # the next client is unaffected


def test_an_unreachable_upstream_is_502_with_a_clear_message(keys):
    down = f"http://127.0.0.1:{server.free_port('127.0.0.1')}/v1"  # nothing listens there
    srv, thread, url = start_gateway(down, keys["path"], upstream_adapter=ADAPTER)
    try:
        r = post(url, keys["admin"], {"prompt": "Hi", "alpha": 1})
        assert r.status_code == 502 and r.json()["error"]["message"].startswith(f"cannot reach the upstream {down}")
        with pytest.raises(openai.APIStatusError) as err:
            client(url, keys["public"]).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True)
        assert err.value.status_code == 502
        assert httpx.get(url + "/health").json()["active"] == 0
    finally:
        srv.should_exit = True
        thread.join(30)


def test_without_an_adapter_alpha_one_is_refused(upstream, keys, seen):
    srv, thread, url = start_gateway(upstream[0], keys["path"])  # the upstream's base is MODEL itself
    try:
        r = post(url, keys["admin"], {"prompt": "Hi", "alpha": 1})
        assert r.status_code == 403 and "no adapter configured" in r.json()["error"]["message"]
        assert seen == []
        assert client(url, keys["admin"]).completions.create(model=MODEL, prompt="Hi").choices[0].text == \
            f"served by {MODEL}"
        assert httpx.get(url + "/health").json()["max_alpha"] == 0
    finally:
        srv.should_exit = True
        thread.join(30)


def test_gateway_settings_are_checked(capsys):
    for bad, flag in (({"upstream": "ftp://host/v1", "model_name": "m"}, "--upstream"),
                      ({"upstream": "localhost:8000", "model_name": "m"}, "--upstream"),
                      ({"upstream": "http://h:1/v1"}, "--upstream-model"),
                      ({"upstream_adapter": "a"}, "--upstream-adapter"),
                      ({"upstream": "http://h:1/v1", "model_name": "m", "upstream_timeout_s": 0}, "--upstream-timeout")):
        with pytest.raises(ServeConfigError, match=flag):
            ServeConfig(**bad)
    assert ServeConfig(upstream="http://h:1", model_name="m").upstream_base == "http://h:1/v1"
    assert ServeConfig(upstream="https://h/x/v1/", upstream_model="b").served_model_name == "b"
    assert main(["serve"]) == 2
    assert "--upstream" in capsys.readouterr().err
    assert main(["serve", "some-artifact", "--upstream", "http://h:1/v1", "--model-name", "m"]) == 2
    assert "not both" in capsys.readouterr().err
