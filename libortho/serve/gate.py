"""Which alpha a request is served at: the privilege gate.

Rules, in the order they are checked:
  * with a key store: no key or an unknown key -> 401;
  * without one (base-only mode): no key is needed and the ceiling is 0;
  * the `X-Libortho-Alpha` header and the body's `alpha` must agree when both are given -> else 400;
  * the asked alpha must be a number in [0, 1] -> else 400;
  * asked above the key's max_alpha -> 403; asked above what the server can serve (no ortho
    stream loaded) -> 403;
  * nothing asked -> the key's default_alpha, capped at what the server can serve (so an
    artifact without its ortho stream answers at 0 rather than refusing every request).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .keys import KeyStore

ALPHA_HEADER = "x-libortho-alpha"


class GateError(Exception):
    """A request refused by the gate: HTTP status, OpenAI error type / code, message."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


@dataclass(frozen=True)
class Grant:
    """The outcome of the gate: the alpha to serve at and who asked (for logs and metrics)."""

    alpha: float
    key_name: str


def parse_alpha(value: object, source: str) -> float:
    """A client-supplied alpha as a float in [0, 1], or GateError 400."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise GateError(400, f"{source} must be a number in [0, 1], got {value!r}", "invalid_request_error",
                            "invalid_alpha") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GateError(400, f"{source} must be a number in [0, 1], got {value!r}", "invalid_request_error",
                        "invalid_alpha")
    if not 0.0 <= float(value) <= 1.0:
        raise GateError(400, f"{source} must lie in [0, 1], got {value}", "invalid_request_error", "invalid_alpha")
    return float(value)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class AlphaGate:
    """Maps (API key, asked alpha) to the alpha served. `servable_max` is 0 when the ortho stream
    is not loaded (base-only mode, or an artifact without ortho.safetensors), else 1."""

    def __init__(self, keys: KeyStore | None, servable_max: float) -> None:
        self.keys = keys
        self.servable_max = servable_max

    def authenticate(self, authorization: str | None) -> tuple[str, float, float]:
        """(key name, max_alpha, default_alpha) of the caller, or GateError 401."""
        if self.keys is None:
            return "anonymous", 0.0, 0.0
        key = bearer_key(authorization)
        if key is None:
            raise GateError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", "invalid_request_error",
                            "invalid_api_key")
        entry = self.keys.lookup(key)
        if entry is None:
            raise GateError(401, "invalid API key", "invalid_request_error", "invalid_api_key")
        return entry.name, entry.max_alpha, entry.default_alpha

    def grant(self, authorization: str | None, header_alpha: str | None, body_alpha: object) -> Grant:
        """The alpha this request is served at, or GateError (401 / 400 / 403)."""
        name, max_alpha, default_alpha = self.authenticate(authorization)
        asked_header = parse_alpha(header_alpha, "the X-Libortho-Alpha header") if header_alpha is not None else None
        asked_body = parse_alpha(body_alpha, "'alpha'") if body_alpha is not None else None
        if asked_header is not None and asked_body is not None and asked_header != asked_body:
            raise GateError(400, f"the X-Libortho-Alpha header ({asked_header:g}) and the body's 'alpha' "
                                 f"({asked_body:g}) disagree; send one, or the same value in both",
                            "invalid_request_error", "conflicting_alpha")
        asked = asked_header if asked_header is not None else asked_body
        if asked is None:
            return Grant(min(default_alpha, self.servable_max), name)
        if self.keys is None and asked > 0:
            raise GateError(403, f"alpha {asked:g} refused: this server runs in base-only mode (started without "
                                 "--keys) and serves alpha 0 only", "permission_error", "alpha_not_allowed")
        if asked > max_alpha:
            raise GateError(403, f"alpha {asked:g} refused: the key {name!r} may use alpha up to {max_alpha:g}",
                            "permission_error", "alpha_not_allowed")
        if asked > self.servable_max:
            raise GateError(403, f"alpha {asked:g} refused: this server has no ortho stream loaded and serves "
                                 "alpha 0 only", "permission_error", "alpha_not_allowed")
        return Grant(asked, name)
