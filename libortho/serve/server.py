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
from pathlib import Path

import uvicorn

from .. import modelio
from .app import ServerState, create_app
from .engine import Engine
from .gate import AlphaGate
from .keys import KeyStore
from .metrics import Metrics

log = logging.getLogger("libortho.serve")


def load_for_serving(path: str | Path, keys: KeyStore | None, device: str = "cpu"):
    """(model, tokenizer, servable max alpha). The ortho stream is loaded only if some key may use
    it and the artifact has it; otherwise ortho.safetensors is never opened and alpha is fixed at 0."""
    path = Path(path)
    has_ortho = (path / modelio.ORTHO_FILE).is_file()
    needed = keys is not None and keys.max_alpha > 0
    with_ortho = has_ortho and needed
    if needed and not has_ortho:
        log.warning("%s has no %s: serving alpha 0 only, whatever the keys allow", path, modelio.ORTHO_FILE)
    if keys is None:
        log.warning("no --keys: base-only mode, every request is served at alpha 0")
    # alpha=0 default: the model's own default is never what a request runs at (each forward is
    # scoped), but if it were, it would be the base model
    model, tok = modelio.load(path, alpha=0.0, device=device, with_ortho=with_ortho)
    return model, tok, 1.0 if with_ortho else 0.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains instead of closing the listening socket."""

    def __init__(self, config: uvicorn.Config, state: ServerState, engine: Engine) -> None:
        super().__init__(config)
        self.state, self.engine = state, engine

    def handle_exit(self, sig: int, frame) -> None:
        if self.state.draining:  # second signal: stop now
            self.should_exit = self.force_exit = True
            return
        log.info("signal %d: draining (in flight: %d, queued: %d)", sig, self.state.in_flight, self.engine.queued)
        self.state.draining = True  # not recorded in _captured_signals: a drained exit is a clean exit

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and self.state.in_flight == 0 and self.engine.idle():
            log.info("drained: shutting down")
            return True
        return await super().on_tick(counter)


def build(artifact: str | Path, keys_path: str | Path | None = None, device: str = "cpu", max_batch: int = 8,
          max_wait_ms: float = 10.0, max_queue: int = 256, model_name: str | None = None):
    """(app, engine, state) for an artifact, not yet running."""
    keys = KeyStore.load(keys_path) if keys_path is not None else None
    model, tok, servable_max = load_for_serving(artifact, keys, device)
    engine = Engine(model, tok, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, metrics=Metrics())
    state = ServerState()
    app = create_app(engine, AlphaGate(keys, servable_max), model_name or Path(artifact).resolve().name, state)
    return app, engine, state


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, keys_path: str | Path | None = None,
          device: str = "cpu", max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 256,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Run until drained by a signal (blocks; signals are handled when called from the main thread)."""
    app, engine, state = build(artifact, keys_path, device, max_batch, max_wait_ms, max_queue, model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    DrainingServer(config, state, engine).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_in_thread(app, engine: Engine, state: ServerState, host: str = "127.0.0.1",
                    port: int | None = None) -> tuple[DrainingServer, threading.Thread, str]:
    """Start the app in a background thread (tests, benchmarks); (server, thread, base URL).
    Stop it with `server.should_exit = True; thread.join()`."""
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = DrainingServer(config, state, engine)
    thread = threading.Thread(target=server.run, name="libortho-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread, f"http://{host}:{port}"
