"""What the HTTP handlers and the process runner share: one ServerState per app, stored on
`app.state` and handed to the handlers by a FastAPI dependency."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Request

from .config import ServeConfig

if TYPE_CHECKING:
    from .engine import Engine
    from .gate import AlphaGate
    from .gateway import Gateway
    from .keywatch import KeysWatcher
    from .metrics import Metrics


@dataclass
class ServerState:
    """The engine (or the gateway's forwarder), the gate and the settings of one server, plus its lifecycle: draining after
    SIGTERM, and the number of requests in flight (the drain waits for it to reach 0).
    `config.model_name` is the id clients send (never None here)."""

    engine: Engine | Gateway  # in gateway mode, the Gateway stands in for the engine
    gate: AlphaGate
    config: ServeConfig
    chat_problem: str | None = None  # why chat cannot be served (no template, or a failing one); None: it can
    keys_watcher: KeysWatcher | None = None  # keeps the gate's keys in step with KEYS.json (None: no key store)
    gateway: Gateway | None = None  # gateway mode: requests go to this upstream forwarder (also `engine`)
    created: int = field(default_factory=lambda: int(time.time()))  # Unix seconds, /v1/models' `created`
    draining: bool = False
    in_flight: int = 0

    @property
    def metrics(self) -> Metrics:
        return self.engine.metrics

    @property
    def model_name(self) -> str:
        return self.config.model_name


def attach(app: FastAPI, state: ServerState) -> None:
    """Store the app's one ServerState on it (read back with `state_of`)."""
    app.state.server = state


def state_of(app: FastAPI) -> ServerState:
    """The ServerState that `attach` stored on the app."""
    return app.state.server


def _request_state(request: Request) -> ServerState:
    return state_of(request.app)


# a handler parameter annotated `state: State` receives the app's ServerState
State = Annotated[ServerState, Depends(_request_state)]
