"""OpenAI's HTTP API: /v1/completions and /v1/chat/completions (streamed as server-sent events or
not) and /v1/models. Every one needs an API key when the server has a key store. In gateway mode
the generation requests are forwarded to the upstream engine once admitted (gateway.py)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .generation import authenticate, generate
from .state import State

router = APIRouter(prefix="/v1")


@router.post("/completions")
async def completions(request: Request, state: State) -> Response:
    return await _answer(request, state, "completions")


@router.post("/chat/completions")
async def chat_completions(request: Request, state: State) -> Response:
    return await _answer(request, state, "chat")


async def _answer(request: Request, state: State, endpoint: str) -> Response:
    if state.gateway is not None:
        return await state.gateway.forward(request, state, endpoint)
    return await generate(request, state, endpoint)


@router.get("/models")
async def models(request: Request, state: State) -> JSONResponse:
    authenticate(request, state)
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "libortho"}]})
