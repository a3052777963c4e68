"""The operator's endpoints, open without a key: /health (for load balancers: 503 while
draining) and /metrics (Prometheus)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from .state import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> JSONResponse:
    body = {"status": "draining" if state.draining else "ok", "model": state.model_name,
            "max_alpha": state.gate.servable_max, "queued": state.engine.queued, "active": state.engine.active}
    return JSONResponse(body, status_code=503 if state.draining else 200)


@router.get("/metrics")
async def prometheus(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")
