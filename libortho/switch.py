"""The alpha switch of a decomposed model: one `AlphaState` per model, shared by its layers.

Rules (fail closed: alpha only goes above 0 where the caller asked for it):

* The default is 0 after `decompose` and `load`; `set_alpha(model, a)` changes it.
* `with alpha(model, a):` scopes a value to the current thread / asyncio task (a ContextVar;
  `asyncio.to_thread` and `contextvars.copy_context().run` carry it along).
* A forward pass reads alpha once, at the model's entry (a forward pre-hook on the model the
  state is attached to), and pins it for every layer of that pass: a concurrent `set_alpha`
  can never give one pass a mix of alphas across layers.
* A pass without a scope of its own (e.g. a `threading.Thread` or `TextIteratorStreamer`
  started inside a scope: plain threads do not copy contextvars) runs at the lowest of the
  default and every scope active on that model in any thread. It never runs above a scope
  that is open somewhere, nor above the default; to run a thread above that, open a scope
  inside the thread.
* A per-row alpha is a 1-D tensor, one value per sequence. Give it as a CPU tensor: it is
  checked on the host for free and moved to the pass's input device once, when the pass
  starts (a tensor already on a GPU costs a host sync to check).
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import numbers
import threading
from typing import Iterator

import torch
from torch import nn

from .state import state_of

AlphaValue = float | torch.Tensor
_state_ids = itertools.count()


class AlphaError(ValueError):
    """An alpha that is not a number in [0, 1]; the message names where it came from."""


def parse_alpha(value: object, what: str = "alpha", *, text: bool = False) -> float:
    """One scalar alpha as a float in [0, 1] (-0 becomes 0), else AlphaError naming `what`.

    Accepts real numbers (int, float, NumPy scalars), and with `text` a string holding a number (a CLI argument, an HTTP
    header). Refuses booleans (in JSON, ``true`` is a typo, not 1.0), NaN and infinities.
    """
    if text and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise AlphaError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AlphaError(f"{what} must be a number in [0, 1], got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise AlphaError(f"{what} must lie in [0, 1], got a number of {len(str(abs(int(value))))} digits") from None
    if not math.isfinite(value):
        raise AlphaError(f"{what} must be a finite number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise AlphaError(f"{what} must lie in [0, 1], got {value!r}")
    return value + 0.0  # -0.0 + 0.0 == +0.0


class AlphaState:
    """The alpha of one model: a default, per-context scopes, and the value pinned for the running pass."""

    def __init__(self, default: float = 0.0, ortho_available: bool = True) -> None:
        self.ortho_available = ortho_available
        self.default: AlphaValue = self.check(default) if ortho_available else 0.0
        ident = next(_state_ids)
        self._scope: contextvars.ContextVar[AlphaValue | None] = contextvars.ContextVar(
            f"libortho_alpha_scope_{ident}", default=None
        )
        self._pinned: contextvars.ContextVar[AlphaValue | None] = contextvars.ContextVar(
            f"libortho_alpha_pinned_{ident}", default=None
        )
        self._lock = threading.Lock()
        self._active: dict[int, float] = {}  # scope id -> the lowest alpha of that scope
        self._scope_ids = itertools.count()
        self._pins = threading.local()  # per-thread stack of pin tokens (pre/post hooks pair up)

    def __deepcopy__(self, memo) -> "AlphaState":
        """A copied model gets its own switch with the same default and no open scopes."""
        return AlphaState(self.default if not isinstance(self.default, torch.Tensor) else self.default.clone(),
                          self.ortho_available)

    # ---- validation -----------------------------------------------------------------------
    def check(self, value: AlphaValue) -> AlphaValue:
        """Validate an alpha (float in [0, 1], or a 1-D tensor of them, one per sequence row)."""
        if isinstance(value, torch.Tensor):
            if value.dim() != 1:
                raise ValueError(f"a per-row alpha must be a 1-D tensor, got shape {tuple(value.shape)}")
            if value.numel() == 0:
                raise ValueError("a per-row alpha tensor must not be empty")
            lo, hi = (float(v) for v in torch.aminmax(value.detach().float()))  # free on the host; one sync on a device
            if not (0.0 <= lo and hi <= 1.0):  # also refuses NaN
                raise AlphaError(f"a per-row alpha must lie in [0, 1], got values from {lo} to {hi}")
        else:
            value = lo = hi = parse_alpha(value)
        if hi > 0 and not self.ortho_available:
            raise ValueError(
                "this model was loaded without its ortho stream (ortho.safetensors), so alpha is fixed at 0; "
                "load the artifact with its ortho file to raise alpha"
            )
        return value

    # ---- scopes ---------------------------------------------------------------------------
    def lowest(self, value: AlphaValue) -> float:
        """The lowest alpha of a checked value (a per-row tensor's minimum)."""
        return float(value.detach().min()) if isinstance(value, torch.Tensor) else value

    @contextlib.contextmanager
    def scoped(self, value: AlphaValue) -> Iterator[None]:
        value = self.check(value)
        low = self.lowest(value)
        with self._lock:
            sid = next(self._scope_ids)
            self._active[sid] = low
        token = self._scope.set(value)
        try:
            yield
        finally:
            self._scope.reset(token)
            with self._lock:
                del self._active[sid]

    def resolve(self) -> AlphaValue:
        """The alpha a pass starting now in this context runs at (see the module docstring)."""
        own = self._scope.get()
        if own is not None:
            return own
        default = self.default
        with self._lock:
            bound = min(self._active.values(), default=None)
        if bound is None:
            return default
        if isinstance(default, torch.Tensor):
            return default.clamp(max=bound)
        return min(default, bound)

    def get(self) -> AlphaValue:
        """The alpha in force here: the running pass's pinned value, else what a new pass would get."""
        pinned = self._pinned.get()
        return self.resolve() if pinned is None else pinned

    # ---- one value per forward pass ---------------------------------------------------------
    def pin(self, device: torch.device | None = None) -> None:
        """Enter a pass: resolve alpha once (nested calls keep the outer pass's value). A per-row
        alpha moves to `device` (the pass's input device) here, once per pass, not once per layer."""
        stack = self._pins.__dict__.setdefault("stack", [])
        if self._pinned.get() is not None:
            stack.append(None)
            return
        value = self.resolve()
        if isinstance(value, torch.Tensor) and device is not None and value.device != device:
            value = value.to(device, non_blocking=True)
        stack.append(self._pinned.set(value))

    def unpin(self) -> None:
        stack = self._pins.__dict__.get("stack")
        if stack:
            token = stack.pop()
            if token is not None:
                self._pinned.reset(token)


# ---- the model-level switch -----------------------------------------------------------------
def alpha_state(model: nn.Module) -> AlphaState:
    """The AlphaState shared by the model's OrthoLinear layers."""
    return state_of(model).alpha


def set_alpha(model: nn.Module, value: AlphaValue) -> None:
    """Set the model's default alpha (float in [0, 1] or a per-row tensor)."""
    state = alpha_state(model)
    state.default = state.check(value)


def get_alpha(model: nn.Module) -> AlphaValue:
    return alpha_state(model).get()


@contextlib.contextmanager
def alpha(model: nn.Module, value: AlphaValue) -> Iterator[nn.Module]:
    """Scoped alpha for the current thread / task: ``with libortho.alpha(model, 0.0): model.generate(...)``."""
    with alpha_state(model).scoped(value):
        yield model
