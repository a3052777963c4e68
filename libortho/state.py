"""`OrthoState`: everything libortho knows about one decomposed model beyond its layers' buffers.

One object per model, the only attribute libortho sets on a Hugging Face model
(``model.libortho_state``). Who writes and who reads it:

  decompose.install   creates it: the config, the provenance, the alpha switch at 0;
  decompose           adds the decomposition's stats;
  artifact.load       creates it from the manifest (config, provenance, stats as stored; the
                      switch knows whether the ortho stream was loaded);
  artifact.save       reads it to write the manifest, so load -> save keeps every field;
  switch, serve, cli  read the switch (alpha) and, for `info`, the rest.

The alpha switch's forward hooks (pin alpha once per pass) are registered by `attach` and their
handles kept here, so attaching again replaces them instead of stacking a second pair.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .config import OrthoConfig
    from .switch import AlphaState

STATE_ATTRIBUTE = "libortho_state"


@dataclass(eq=False)
class OrthoState:
    """alpha: the model's switch, shared by its OrthoLinear layers. config: the decomposition's
    settings (None when an artifact did not record them). provenance / stats: the manifest's keys
    of the same names (stats: the decomposition's counts and errors, and the only timings)."""

    alpha: "AlphaState"
    config: "OrthoConfig | None" = None
    provenance: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    _hooks: tuple = field(default=(), repr=False)

    @property
    def ortho_loaded(self) -> bool:
        """Whether the model holds its ortho stream (else alpha is fixed at 0)."""
        return self.alpha.ortho_available

    def __deepcopy__(self, memo) -> "OrthoState":
        """A copied model gets its own state; its (copied) hooks already point at the copy."""
        return replace(self, alpha=copy.deepcopy(self.alpha, memo), provenance=copy.deepcopy(self.provenance, memo),
                       stats=copy.deepcopy(self.stats, memo), _hooks=())


def state_of(model: nn.Module) -> OrthoState:
    """The model's OrthoState, or ValueError saying how to get a decomposed model."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if isinstance(state, OrthoState):
        return state
    raise ValueError(
        "this model has no libortho layers; decompose it with libortho.decompose(...) "
        "or load an artifact with libortho.load(...)"
    )


def attach(model: nn.Module, state: OrthoState, layers: list[nn.Module]) -> None:
    """Make `layers` share `state.alpha` and pin alpha at `model`'s entry for each forward pass."""
    old = getattr(model, STATE_ATTRIBUTE, None)
    for handle in getattr(old, "_hooks", ()):
        handle.remove()
    for layer in layers:
        layer.alpha_state = state.alpha
    # always_call: a pass that raises must still unpin, or the next pass would reuse its value.
    state._hooks = (
        model.register_forward_pre_hook(_pin_hook, with_kwargs=True),
        model.register_forward_hook(_unpin_hook, always_call=True),
    )
    setattr(model, STATE_ATTRIBUTE, state)


def _pin_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state = getattr(module, STATE_ATTRIBUTE, None)
    if isinstance(state, OrthoState):
        state.alpha.pin(_input_device(args, kwargs))


def _unpin_hook(module: nn.Module, args, output) -> None:
    state = getattr(module, STATE_ATTRIBUTE, None)
    if isinstance(state, OrthoState):
        state.alpha.unpin()


def _input_device(args: tuple, kwargs: dict):
    """The device of the pass's first tensor input (where a per-row alpha has to go), or None."""
    for value in (*args, *kwargs.values()):
        device = getattr(value, "device", None)
        if device is not None and hasattr(value, "dim"):
            return device
    return None
