"""The HTTP API (FastAPI): OpenAI's endpoints (`routes_openai`) and the operator's /health and
/metrics (`routes_ops`), sharing one ServerState.

Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
never a traceback. The alpha a request was served at is echoed in `system_fingerprint`
("libortho:alpha=A") and in the `X-Libortho-Alpha` response header, and logged.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import routes_openai, routes_ops
from .errors import install_error_handlers
from .state import ServerState, attach


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app serving `state.engine`'s model as `state.model_name`. The engine is started
    and stopped with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        if state.keys_watcher is not None:
            state.keys_watcher.start()
        yield
        # uvicorn calls this after the last connection closed: nothing is left to serve
        if state.keys_watcher is not None:
            await asyncio.to_thread(state.keys_watcher.stop)
        await asyncio.to_thread(state.engine.stop)
        if state.gateway is not None:  # its HTTP client, closed in the event loop that used it
            await state.gateway.aclose()

    app = FastAPI(title="libortho serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    attach(app, state)
    install_error_handlers(app)
    app.include_router(routes_ops.router)
    app.include_router(routes_openai.router)
    return app
