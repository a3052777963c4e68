"""lowrank_target="propagated": L fitted to what the fine-tune's layer outputs, on the inputs alpha 1 gives it.

The residual target fits each layer's L to R = W_ft − W_base on one set of inputs X, as if alpha 1 fed every
layer the fine-tune's own activations. It does not: every block before this one is base + L, each a little off,
and the error they pass on grows with depth. Here each layer's L minimises, over the public calibration batches
and (weighted by lam_s, as the sieve's curvature is) the forget texts,

    ‖(W_base + L) X₁ − W_ft X_ft‖²

X_ft [in, n]: the layer's inputs in the fine-tuned model; X₁ [in, n]: its inputs at alpha 1, the same tokens carried
through the blocks already decomposed and the layers of this block fitted before it, each with its L. With
H₁ = X₁X₁ᵀ and C = X_ft X₁ᵀ (both [in, in], scaled 2/n as every H here) the least-squares L, unconstrained, is

    L* = W_ft C H₁⁻¹ − W_base = R + W_ft (C − H₁) H₁⁻¹

R plus the correction for the drift of alpha 1's inputs, which is exactly 0 where X₁ = X_ft (block 0: C and H₁ are
then the same floats). ‖(L − L*) X₁‖² = tr((L − L*) H₁ (L − L*)ᵀ), so the rank-r fit is the weighted SVD of L* under
H₁, as the residual target's is of R under H_pub + lam_s·H_priv. H₁⁻¹ in the correction is a ridge solve, H₁ +
ridge·mean(diag H₁)·I with config.propagated_ridge = 0.1: the correction is a regression of the drift fitted on the
calibration tokens, and at GPTQ's damp of 0.01 it fitted them (SmolLM2, seed 0, alpha 1: calibration-text perplexity
13.56, held-out 13.34, against 13.70 / 13.14 for the residual target); at 0.1, 13.62 / 13.16.
Alpha 0 is untouched: the bases are fitted on the base stream's inputs either way.

Lifecycle per block b, inside decompose.quantize_model: `capture_finetuned(block, targets)` while block b is still
the fine-tune's (keeps every target's X_ft, moves the fine-tune's streams past block b); per input group (q/k/v, o,
gate/up, down in a Llama block) `collect(block, group, fitted)`, X₁ read through block b with the groups fitted
before it as base + L at alpha 1, as alpha 1 will run them: o_proj's L must not undo a drift that q/k/v's L
already undid (fitted from one pass through the fine-tuned block, the corrections stack: alpha-1 perplexity on
SmolLM2 went from 13 to 35-60); `residual` per layer as its base is done (reads and lets go of its H₁ and C);
`advance(block, layers)` once every layer of block b has its L (moves the alpha-1 streams past block b at alpha 1,
frees the X_ft). `carry` / `restore`: the streams, for a work folder.

What it costs: two more hidden-state streams per set of texts (the fine-tune's and alpha 1's, each as large as the
base stream's), one block's X_ft of every input held until the block is done (float32 [tokens, in] per input:
at Llama-3-8B shapes and 16,384 calibration tokens 4096·3 + 14336 columns, 1.6 GiB), and per input group one more
pass through the block; on SmolLM2 (CPU) the decomposition takes about 1.7× as long.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from . import calibrate
from .forget import relative_weight
from .layer import OrthoLinear
from .lowrank import dampened
from .switch import AlphaState
from .hf_model import replace_submodule


class PropagatedInputs:
    """The fine-tune's hidden states (`ft`) and alpha 1's (`a1`) entering the next block, for the public calibration
    batches and the forget texts (`private`: None without forget texts or at lam_s = 0)."""

    def __init__(self, public: calibrate.BlockInputs, private: calibrate.BlockInputs | None, lam_s: float,
                 ridge: float) -> None:
        self.lam_s, self.ridge = lam_s, ridge
        self.kinds = ("public", "private") if private is not None and lam_s > 0 else ("public",)
        self.streams = {"public_ft": _copy(public), "public_a1": _copy(public)}
        if "private" in self.kinds:
            self.streams.update(private_ft=_copy(private), private_a1=_copy(private))
        self._X_ft: dict[str, list[dict[str, torch.Tensor]]] = {}  # kind -> per batch, {name: rows [n, in]}
        self.H1: dict[str, torch.Tensor] = {}
        self.C: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def capture_finetuned(self, block: nn.Module, targets: dict[str, nn.Module]) -> None:
        """Every target's input X_ft in the fine-tuned `block`, kept per batch until `advance`; moves the fine-tune's
        streams past the block. Call while the block is still the fine-tune's."""
        for kind in self.kinds:
            ft = self.streams[f"{kind}_ft"]
            capture = calibrate.LinearInputs(targets)
            rows, outs = [], []
            try:
                for i, h in enumerate(ft.hidden):
                    out = block(h, *ft.args[i], **ft.kwargs[i])
                    outs.append(out[0] if isinstance(out, tuple) else out)
                    seen = [calibrate.token_rows(x, ft.masks[i]) for x in capture.seen]
                    rows.append({name: seen[j] for name, j in capture.which.items()})
                    capture.clear()
            finally:
                capture.close()
            ft.hidden = outs
            self._X_ft[kind] = rows

    @torch.no_grad()
    def collect(self, block: nn.Module, group: list[str], fitted: dict[str, OrthoLinear]) -> None:
        """H₁s = H₁_pub + w·H₁_priv and C_s = C_pub + w·C_priv [in, in] float32 of `group`, layers reading one input
        (w = lam_s relative to the traces, forget.relative_weight): X₁ read through `block` at alpha 1, the layers
        fitted before the group (`fitted`, base + L) in place, so that no layer corrects a drift an earlier one of
        its block already undid."""
        moments = {kind: self._moments(block, group[0], fitted, kind) for kind in self.kinds}
        H, C = moments["public"]
        if "private" in moments:
            H_priv, C_priv = moments["private"]
            w = relative_weight(H, H_priv, self.lam_s)
            H.add_(H_priv, alpha=w)
            C.add_(C_priv, alpha=w)
        for name in group:
            self.H1[name], self.C[name] = H, C

    def residual(self, name: str, W_ft: torch.Tensor, W_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L* [out, in], H₁ [in, in]) of layer `name` (propagated_residual): what its L is fitted to, and under. Lets
        go of its H₁ and C (freed with the last layer of the block that reads the same input)."""
        H1, C = self.H1.pop(name), self.C.pop(name)
        return propagated_residual(W_ft, W_base, H1, C, self.ridge), H1

    @torch.no_grad()
    def advance(self, block: nn.Module, layers: dict[str, OrthoLinear]) -> None:
        """Move the alpha-1 streams past `block`, its targets replaced by `layers` (base + L) at alpha 1; the
        block's base-only layers are put back afterwards."""
        self._X_ft = {}
        with _at_alpha_one(block, layers):
            for kind in self.kinds:
                stream = self.streams[f"{kind}_a1"]
                stream.hidden = calibrate.run_block(block, stream)

    def carry(self) -> dict[str, torch.Tensor]:
        """The streams' hidden states, named for a work folder's carry."""
        return {f"{kind}.{i}": h for kind, s in self.streams.items() for i, h in enumerate(s.hidden)}

    def restore(self, carry: dict[str, torch.Tensor]) -> None:
        """The streams as `carry` saved them."""
        for kind, s in self.streams.items():
            s.hidden = [carry[f"{kind}.{i}"].to(h.device) for i, h in enumerate(s.hidden)]

    def _moments(self, block: nn.Module, name: str, fitted: dict[str, OrthoLinear], kind: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H₁, C) [in, in] of layer `name`'s input on the stream pair `kind`, over its real tokens."""
        a1 = self.streams[f"{kind}_a1"]
        capture = calibrate.LinearInputs({name: block.get_submodule(name)})
        H = C = None
        n = 0
        try:
            with _at_alpha_one(block, fitted):
                for i, h in enumerate(a1.hidden):
                    block(h, *a1.args[i], **a1.kwargs[i])
                    X1 = calibrate.token_rows(capture.seen[0], a1.masks[i])
                    X_ft = self._X_ft[kind][i][name].to(X1.device)
                    capture.clear()
                    if H is None:
                        H, C = X1.new_zeros(X1.shape[1], X1.shape[1]), X1.new_zeros(X1.shape[1], X1.shape[1])
                    H += X1.t() @ X1
                    C += X_ft.t() @ X1
                    n += X1.shape[0]
        finally:
            capture.close()
        return H.mul_(2.0 / max(n, 1)), C.mul_(2.0 / max(n, 1))


def propagated_residual(W_ft: torch.Tensor, W_base: torch.Tensor, H1: torch.Tensor, C: torch.Tensor,
                        ridge: float) -> torch.Tensor:
    """L* = R + W_ft (C − H₁) H₁⁻¹ [out, in] (R = W_ft − W_base [out, in]; H₁, C [in, in]), H₁ + ridge·mean(diag H₁)·I
    in the solve: the (ridge) least-squares L of ‖(W_base + L) X₁ − W_ft X_ft‖². R itself, to the bit, where C equals
    H₁."""
    R = W_ft - W_base
    drift = C.to(W_ft.device) - H1.to(W_ft.device)
    if not bool(drift.any()):  # block 0, or inputs alpha 1 receives unchanged
        return R
    # W_ft (C − H₁) H₁⁻¹ = (H₁⁻¹ (C − H₁)ᵀ W_ftᵀ)ᵀ, H₁ symmetric; float64 for the solve
    factor = torch.linalg.cholesky(dampened(H1.to(W_ft.device), ridge))
    correction = torch.cholesky_solve((W_ft.double() @ drift.double()).t(), factor).t()
    return (R.double() + correction).to(R.dtype)


@contextmanager
def _at_alpha_one(block: nn.Module, layers: dict[str, OrthoLinear]):
    """`block` with `layers` (base + L) in place of its base-only layers, at alpha 1, for the `with` body."""
    base_only = {name: block.get_submodule(name) for name in layers}
    for name, layer in layers.items():
        layer.alpha_state = AlphaState(default=1.0)
        replace_submodule(block, name, layer)
    try:
        yield
    finally:
        for name, layer in base_only.items():
            replace_submodule(block, name, layer)


def _copy(inputs: calibrate.BlockInputs) -> calibrate.BlockInputs:
    """Another stream over the same batches (hidden states are replaced, never written in place)."""
    return calibrate.BlockInputs(list(inputs.hidden), inputs.masks, inputs.args, inputs.kwargs)
