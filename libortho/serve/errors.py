"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, for every failure:
a refused request, an unknown route, and a bug (500, never a traceback)."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .gate import GateError

log = logging.getLogger("libortho.serve")


class APIError(Exception):
    """An error answered as {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    @classmethod
    def from_gate(cls, err: GateError, param: str | None = None) -> "APIError":
        return cls(err.status, err.message, err.type, param=param, code=err.code)


def one_line(err: BaseException | str) -> str:
    """An error's text as one line: exception texts (a template's, torch's) may span several."""
    return " ".join(str(err).split())


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Answer APIError, FastAPI's own HTTP errors (404, 405) and anything unexpected in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, err: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), type_)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")
