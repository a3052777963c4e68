"""One decoder block's curvatures, each freed as soon as the last layer that reads it is done.

At in = 4096 every [in, in] float32 matrix is 64 MiB, and one layer's fit derives several from its input's
Hessians: H', its Cholesky factor and the pull term (forget.py), the upper factor of H'⁻¹ (GPTQ), the sieve's
curvature. Layers that read the same input (q/k/v, gate/up) share them all, so each is kept until the last
of those layers has used it and no longer: the block's peak holds one input's curvatures, not the block's.
Nothing here changes a float: the same matrices are computed in the same order, only dropped earlier.
"""
from __future__ import annotations

from collections import Counter

import torch

from .config import OrthoConfig
from .forget import FitTarget, ForgetObjective
from .quantize import hinv_upper


class BlockCurvatures:
    """H_pub and H_priv [in, in] of one block's targets (and C, forget_target="public_activations"), by layer
    name (layers reading one input share the tensor), and what the fits derive from them. Call `target`,
    `factor` and `done` in that order per layer."""

    def __init__(self, H_pub: dict[str, torch.Tensor], H_priv: dict[str, torch.Tensor], config: OrthoConfig,
                 cross: dict[str, torch.Tensor] | None = None, sieve_priv: dict[str, torch.Tensor] | None = None) -> None:
        self.pub, self.priv, self.config = H_pub, H_priv, config
        # sieve_private_inputs="finetuned": the sieve's H_priv, collected on the fine-tuned block's private inputs
        self.sieve_priv = sieve_priv
        self.cross = cross or {}  # forget_target="public_activations": C [in, in] per layer (public_target.py)
        self.objective = ForgetObjective(config)
        self._factors: dict[int, torch.Tensor] = {}  # id(H') -> upper factor of H'⁻¹, while a reader is left
        self._readers = Counter(id(H) for H in H_pub.values())  # layers left to fit, per input

    def add_private(self, H_priv: dict[str, torch.Tensor], cross: dict[str, torch.Tensor]) -> None:
        """H_priv and C [in, in] of the next input group, collected just before it is fitted (forget_target=
        "public_activations", public_target.py); before any of that group's layers calls `target`."""
        self.priv.update(H_priv)
        self.cross.update(cross)

    def __contains__(self, name: str) -> bool:
        return name in self.pub

    def last_reader(self, name: str) -> bool:
        """Whether no layer after `name` reads its input."""
        return self._readers[id(self.pub[name])] == 1

    def target(self, name: str, W: torch.Tensor, W_P: torch.Tensor | None) -> FitTarget:
        """W* and H' of layer `name` (forget.ForgetObjective.fit) for its weight W [out, in]."""
        return self.objective.fit(W, W_P, self.pub[name], self.priv.get(name), last_reader=self.last_reader(name),
                                  C=self.cross.get(name))

    def factor(self, name: str, H_fit: torch.Tensor) -> torch.Tensor | None:
        """The upper Cholesky factor of H'⁻¹ that GPTQ uses, computed once per input; None where GPTQ
        computes its own (act-order) or does not run."""
        if self.config.method != "gptq" or self.config.act_order:
            return None
        key = id(H_fit)
        factor = self._factors[key] if key in self._factors else hinv_upper(H_fit, self.config.damp)
        if self.last_reader(name):
            self._factors.pop(key, None)
        else:
            self._factors[key] = factor
        return factor

    def done(self, name: str) -> torch.Tensor:
        """Layer `name` no longer reads its Hessians: returns its sieve curvature (H_pub + lam_s H_priv) and
        frees what no later layer reads."""
        H_priv = (self.priv if self.sieve_priv is None else self.sieve_priv).get(name)
        H_sieve = self.objective.sieve_curvature(self.pub[name], H_priv, self.last_reader(name))
        self._readers[id(self.pub[name])] -= 1
        del self.pub[name]
        self.priv.pop(name, None)
        self.cross.pop(name, None)
        if self.sieve_priv is not None:
            self.sieve_priv.pop(name, None)
        return H_sieve
