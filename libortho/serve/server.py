"""Running the server: load an artifact for serving, and run uvicorn with a graceful drain.

Drain: the first SIGTERM (or SIGINT) turns the server to draining: new generation requests get
503 and /health answers 503, requests in flight run to the end; once none is left, uvicorn
shuts down and the process exits 0. A second signal exits at once.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from .. import artifact, artifact_format
from .app import create_app
from .config import ServeConfig
from .engine import Engine
from .gate import AlphaGate
from .keys import KeyStore
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
            self.should_exit = self.force_exit = True
            return
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
    keys = KeyStore.load(config.keys_path) if config.keys_path is not None else None
    model, tok, servable_max = load_for_serving(path, keys, config.device)
    named = replace(config, model_name=config.model_name or Path(path).resolve().name)
    return create_app(ServerState(Engine(model, tok, named), AlphaGate(keys, servable_max), named))


def serve(path: str | Path, config: ServeConfig | None = None) -> None:
    """Serve the artifact at `path` until drained by a signal (blocks; signals are handled when
    called from the main thread)."""
    config = config or ServeConfig()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    app = build(path, config)
    DrainingServer(_uvicorn_config(app, config.port, config.log_level), state_of(app)).run()


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
