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

A request is authenticated once (`authenticate`, before its body is parsed, so a caller without a
key learns nothing about what a valid body looks like); `grant` then decides its alpha.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..switch import AlphaError, parse_alpha
from .keys import KeyStore

ALPHA_HEADER = "x-libortho-alpha"


class GateError(Exception):
    """A request refused by the gate: HTTP status, OpenAI error type / code, message."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the key's name and privilege (alphas in [0, 1])."""

    name: str
    max_alpha: float
    default_alpha: float


ANONYMOUS = Caller("anonymous", 0.0, 0.0)  # base-only mode: no key needed, alpha 0 only


@dataclass(frozen=True)
class Grant:
    """The outcome of the gate: the alpha to serve at and who asked (for logs and metrics)."""

    alpha: float
    key_name: str


def shown(alpha: float) -> str:
    """Alpha as text that reads back as the same float: short when that is exact ("0.5", "1"),
    every digit needed when not ("0.50000001" is not shown as "0.5")."""
    short = format(alpha, "g")
    return short if float(short) == alpha else repr(alpha)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def asked_alpha(value: object, source: str, text: bool) -> float | None:
    """A client-supplied alpha (None if not given) as a float in [0, 1], or GateError 400.
    `text`: the value came as a string (a header), not as a JSON number."""
    if value is None:
        return None
    try:
        return parse_alpha(value, source, text=text)
    except AlphaError as err:
        raise GateError(400, str(err), "invalid_request_error", "invalid_alpha") from None


class AlphaGate:
    """Maps (API key, asked alpha) to the alpha served. `servable_max` is 0 when the ortho stream
    is not loaded (base-only mode, or an artifact without ortho.safetensors), else 1."""

    def __init__(self, keys: KeyStore | None, servable_max: float,
                 capped_because: str = "this server has no ortho stream loaded") -> None:
        """`capped_because`: why nothing above `servable_max` can be served, for the 403's message."""
        self.keys = keys
        self.servable_max = servable_max
        self.capped_because = capped_because

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of an `Authorization` header, or GateError 401."""
        if self.keys is None:
            return ANONYMOUS
        key = bearer_key(authorization)
        if key is None:
            raise GateError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", "invalid_request_error",
                            "invalid_api_key")
        entry = self.keys.lookup(key)
        if entry is None:
            raise GateError(401, "invalid API key", "invalid_request_error", "invalid_api_key")
        return Caller(entry.name, entry.max_alpha, entry.default_alpha)

    def grant(self, caller: Caller, header_alpha: str | None, body_alpha: object) -> Grant:
        """The alpha an authenticated caller's request is served at, or GateError (400 / 403)."""
        asked = _one_asked_alpha(asked_alpha(header_alpha, "the X-Libortho-Alpha header", text=True),
                                 asked_alpha(body_alpha, "'alpha'", text=False))
        if asked is None:
            return Grant(min(caller.default_alpha, self.servable_max), caller.name)
        self._check_allowed(caller, asked)
        return Grant(asked, caller.name)

    def _check_allowed(self, caller: Caller, asked: float) -> None:
        """GateError 403 unless the caller may use `asked` and the server can serve it."""
        if self.keys is None and asked > 0:
            raise GateError(403, f"alpha {shown(asked)} refused: this server runs in base-only mode (started without "
                                 "--keys) and serves alpha 0 only", "permission_error", "alpha_not_allowed")
        if asked > caller.max_alpha:
            raise GateError(403, f"alpha {shown(asked)} refused: the key {caller.name!r} may use alpha up to "
                                 f"{shown(caller.max_alpha)}", "permission_error", "alpha_not_allowed")
        if asked > self.servable_max:
            most = "0 only" if self.servable_max == 0 else f"{shown(self.servable_max)} at most"
            raise GateError(403, f"alpha {shown(asked)} refused: {self.capped_because} and serves alpha {most}",
                            "permission_error", "alpha_not_allowed")


def _one_asked_alpha(header: float | None, body: float | None) -> float | None:
    """The alpha asked for by the header or the body; GateError 400 if both are given and differ."""
    if header is not None and body is not None and header != body:
        raise GateError(400, f"the X-Libortho-Alpha header ({shown(header)}) and the body's 'alpha' ({shown(body)}) "
                             "disagree; send one, or the same value in both", "invalid_request_error",
                        "conflicting_alpha")
    return header if header is not None else body
