"""forget_target="public_activations": P's own activations on the forget texts, and per decoder block the
cross-moment C = 2 X_P X_bᵀ / n of each target's input in P (X_P) and in the model (X_b) (forget.py).

P's hidden states of the forget texts are captured at P's block 0 and carried through P's own decoder blocks,
beside the base's, which `decompose.quantize_model` carries through the quantized blocks. Per block b and
private batch: P's block b runs on P's hidden states (its output is what P's block b+1 reads), and the model's
block b, still fine-tuned as when H_priv is collected, on the base's; each target's input is captured in both.
C accumulates X_Pᵀ X_b (rows the tokens) over the batch's real tokens, the token mask HessianCollector uses, and
is divided by their count and doubled as H_priv is. Layers that read one input (q/k/v, gate/up) in both models
share one C, as they share H; `BlockCurvatures.done` lets it go with the last of them.
"""
from __future__ import annotations

import torch
from torch import nn

from . import calibrate
from .hf_model import decoder_blocks


class PublicActivations:
    """P's hidden states entering its next decoder block, for the private batches (ids [B, T], mask [B, T])."""

    def __init__(self, public_model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        public_model.eval()
        _, self.blocks = decoder_blocks(public_model)
        self.inputs = calibrate.capture_block_inputs(public_model, batches, self.blocks[0])

    @torch.no_grad()
    def cross_moments(self, b: int, block: nn.Module, targets: dict[str, nn.Module],
                      private: calibrate.BlockInputs) -> dict[str, torch.Tensor]:
        """C [in, in] float32 of each of block b's `targets` (the model's block b and its linears, by name), on
        the device of the model's block; layers sharing an input share the tensor. Moves P's hidden states on
        to its block b+1."""
        p_block = self.blocks[b]
        p_capture = _Inputs({name: p_block.get_submodule(name) for name in targets})
        b_capture = _Inputs(targets)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = dict.fromkeys(targets, 0)
        shared_by: dict[str, list[tuple[int, int]]] = {name: [] for name in targets}
        outs = []
        try:
            for i, (h_P, h_b) in enumerate(zip(self.inputs.hidden, private.hidden)):
                mask = private.masks[i]
                out = p_block(h_P, *self.inputs.args[i], **self.inputs.kwargs[i])
                outs.append(out[0] if isinstance(out, tuple) else out)
                block(h_b, *private.args[i], **private.kwargs[i])
                products: dict[tuple[int, int], torch.Tensor] = {}  # one X_Pᵀ X_b per pair of inputs
                for name in targets:
                    pair = (p_capture.which[name], b_capture.which[name])
                    if pair not in products:
                        X_b = _rows(b_capture.seen[pair[1]], mask)
                        X_P = _rows(p_capture.seen[pair[0]], mask).to(X_b.device)
                        if X_P.shape != X_b.shape:
                            raise ValueError(f"P's block {b} feeds {name} inputs of shape {tuple(X_P.shape)}, the "
                                             f"model's {tuple(X_b.shape)}: pass the checkpoint the model was fine-tuned from")
                        products[pair] = X_P.t() @ X_b
                    if name in sums:
                        sums[name] += products[pair]
                    else:
                        sums[name] = products[pair].clone()
                    counts[name] += _n_tokens(b_capture.seen[pair[1]], mask)
                    shared_by[name].append(pair)
                del products
                p_capture.clear(), b_capture.clear()
        finally:
            p_capture.close(), b_capture.close()
        self.inputs.hidden = outs
        C: dict[tuple, torch.Tensor] = {}
        for name in targets:
            key = tuple(shared_by[name])
            if key not in C:
                C[key] = sums[name].mul_(2.0).div_(max(counts[name], 1))
            del sums[name]
        return {name: C[tuple(shared_by[name])] for name in targets}


def _n_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> int:
    """The tokens of a batch that count, as HessianCollector counts them: every position, or the unmasked ones."""
    return x[..., 0].numel() if mask is None else int(mask.sum())


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, in] as float32 rows [n, in] of its real tokens (padding, mask 0, left out)."""
    X = x.detach().reshape(-1, x.shape[-1]).float()
    return X if mask is None else X[mask.reshape(-1).to(X.device).bool()]


class _Inputs:
    """The input of each named linear in the batch being run; linears fed the same tensor get one index."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.seen: list[torch.Tensor] = []
        self.which: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            index = next((i for i, seen in enumerate(self.seen) if seen is x), None)
            if index is None:
                index = len(self.seen)
                self.seen.append(x)
            self.which[name] = index

        return hook

    def clear(self) -> None:
        self.seen, self.which = [], {}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.clear()
