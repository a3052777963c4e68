"""Running the server: load an artifact for serving, and run uvicorn with a graceful drain.

Drain: the first SIGTERM (or SIGINT) turns the server to draining: new generation requests get
503 and /health answers 503, requests in flight run to the end; once none is left, uvicorn
shuts down and the process exits 0. A second signal ends the process at once with status 128 +
the signal's number (143 for SIGTERM, 130 for SIGINT): the connections of the requests still in
flight close without an answer, and the status says the exit was cut short, never the 0 of a full
drain. SIGHUP re-reads KEYS.json (see keywatch).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from .. import artifact, artifact_format
from .app import create_app
from .config import ServeConfig, ServeConfigError
from .engine import Engine
from .gate import AlphaGate
from .keys import KeyStore
from .keywatch import KeysWatcher, signature
from .prompts import chat_template_problem
from .state import ServerState, state_of

log = logging.getLogger("libortho.serve")

SERVER_START_TIMEOUT_S = 30.0  # serve_in_thread: how long uvicorn may take to start listening


def load_for_serving(path: str | Path, keys: KeyStore | None, device: str):
    """(model, tokenizer, servable max alpha). The ortho stream is loaded only if some key may use
    it and the artifact has it; otherwise ortho.safetensors is never opened and alpha is fixed at 0."""
    path = Path(path)
    has_ortho = (path / artifact_format.ORTHO_FILE).is_file()
    needed = keys is not None and keys.max_alpha > 0
    with_ortho = has_ortho and needed
    if needed and not has_ortho:
        log.warning("%s has no %s: serving alpha 0 only, whatever the keys allow", path, artifact_format.ORTHO_FILE)
    if keys is None:
        log.warning("no --keys: base-only mode, every request is served at alpha 0")
    # alpha=0 default: the model's own default is never what a request runs at (each forward is
    # scoped), but if it were, it would be the base model
    model, tok = artifact.load(path, alpha=0.0, device=device, with_ortho=with_ortho)
    return model, tok, 1.0 if with_ortho else 0.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains instead of closing the listening socket."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining:  # second signal: stop now
            log.warning("signal %d again: exiting now with status %d, cutting off %d requests in flight", sig,
                        128 + sig, self.state.in_flight)
            sys.stderr.flush()
            # not uvicorn's force_exit: that cancels the handlers mid-await, and every one logs a traceback
            os._exit(128 + sig)
        log.info("signal %d: draining (in flight: %d, queued: %d)", sig, self.state.in_flight,
                 self.state.engine.queued)
        self.state.draining = True  # not recorded in _captured_signals: a drained exit is a clean exit

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and self.state.in_flight == 0 and self.state.engine.idle():
            log.info("drained: shutting down")
            return True
        return await super().on_tick(counter)


def build(path: str | Path, config: ServeConfig | None = None) -> FastAPI:
    """The app serving the artifact at `path`, not yet running; its ServerState is `state_of(app)`."""
    config = config or ServeConfig()
    check_device(config.device)
    keys, seen = None, None
    if config.keys_path is not None:
        seen = signature(Path(config.keys_path))  # before reading: a change while loading is then picked up
        keys = KeyStore.load(config.keys_path)
    model, tok, servable_max = load_for_serving(path, keys, config.device)
    named = replace(config, model_name=config.model_name or Path(path).resolve().name)
    gate = AlphaGate(keys, servable_max)
    state = ServerState(Engine(model, tok, named), gate, named, chat_problem=_chat_problem(tok, named.model_name))
    if config.keys_path is not None:
        state.keys_watcher = KeysWatcher(config.keys_path, gate, config.keys_poll_s, seen)
    return create_app(state)


def check_device(device: str) -> None:
    """ServeConfigError (before any model loads) when the device cannot run here."""
    if device == "cuda" and not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "torch finds no CUDA device"
        raise ServeConfigError(f"device (--device) cuda is not available: {why} (torch {torch.__version__}); "
                               "use --device cpu")


def _chat_problem(tokenizer, model_name: str) -> str | None:
    """Why chat cannot be served, logged once at start-up (None: it can)."""
    tokenizer("warm-up")  # settles the tokenizer's padding/truncation state before threads share it
    problem = chat_template_problem(tokenizer, model_name)
    if problem is not None:
        log.warning("/v1/chat/completions will answer 400: %s", problem)
    return problem


def serve(path: str | Path | None, config: ServeConfig | None = None) -> None:
    """Serve the artifact at `path`, or in gateway mode (`config.upstream`, `path` None) forward to
    the upstream, until drained by a signal (blocks; signals are handled when called from the main
    thread, and a second one ends the process, see above)."""
    config = config or ServeConfig()
    if config.upstream is not None:
        from .gateway import build_gateway  # httpx is imported only by a gateway

        app = build_gateway(config)
    else:
        check_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        app = build(path, config)
    state = state_of(app)
    if state.keys_watcher is not None:
        _reload_keys_on_sighup(state.keys_watcher)
    DrainingServer(_uvicorn_config(app, config.port, config.log_level), state).run()


def _reload_keys_on_sighup(watcher: KeysWatcher) -> None:
    """SIGHUP re-reads KEYS.json (signal handlers can only be set from the main thread, on POSIX)."""
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda _sig, _frame: watcher.reload_soon())


def _uvicorn_config(app: FastAPI, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for the app on its config's host."""
    config = state_of(app).config
    return uvicorn.Config(app, host=config.host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=config.shutdown_grace_s)


def free_port(host: str | None = None) -> int:
    """A TCP port free right now on `host` (default: ServeConfig's default host)."""
    with socket.socket() as s:
        s.bind((host or ServeConfig().host, 0))
        return s.getsockname()[1]


def serve_in_thread(app: FastAPI, port: int | None = None) -> tuple[DrainingServer, threading.Thread, str]:
    """Start the app in a background thread on its config's host (tests, benchmarks), on `port` or a free one;
    (server, thread, base URL). Stop it with `server.should_exit = True; thread.join()`."""
    state = state_of(app)
    host = state.config.host
    port = port or free_port(host)
    server = DrainingServer(_uvicorn_config(app, port, "warning"), state)
    thread = threading.Thread(target=server.run, name="libortho-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, f"http://{host}:{port}"
