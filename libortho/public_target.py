"""forget_target="public_activations": P's own activations on the forget texts, and per decoder block and input
group the base's private curvatures H_priv and the cross-moment C = 2 X_P X_bᵀ / n of each target's input in P
(X_P) and in the model (X_b) (forget.py).

P's hidden states of the forget texts are captured at P's block 0 and carried through P's own decoder blocks,
beside the base's, which `decompose.quantize_model` carries through the quantized blocks.

Sequential private inputs. Within block b the targets are fitted one input group after the other (q/k/v, o_proj,
gate/up, down_proj in a Llama block: the layers reading one input form a group). H_priv and C of a group are
collected just before it is fitted, through the block as it is then: the groups before it already base-only. So
o_proj's X_b is read through the base's q/k/v, gate/up's through the base's attention, down_proj's through the
base's gate/up. Why: at alpha 0 the base's earlier layers of the block already act like P on these tokens; X_b
read through the still fine-tuned layers (as the base_inputs target and H_pub are) would have the later layers
correct the fine-tune's drift a second time (on the default scenario, seed 0: perplexity 109 instead of 14.2,
docs/forget_target/). H_pub stays the fine-tune's, collected once per block, as for every other target.

C accumulates X_Pᵀ X_b (rows the tokens) over the batch's real tokens, the token mask HessianCollector uses, and
is divided by their count and doubled as H_priv is. Layers that read one input (q/k/v, gate/up) in both models
share one C and one H_priv, as they share H_pub; `BlockCurvatures.done` lets them go with the last of them.
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
    def private_curvatures(self, b: int, block: nn.Module, names: list[str], private: calibrate.BlockInputs
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(H_priv, C) [in, in] float32 of the layers `names` of the model's block b, as the block is now (the
        groups fitted before are base-only), on the private batches; on the device of the model's block. Layers
        sharing an input share each tensor. P's hidden states stay at P's block b's input: see `advance`."""
        p_block = self.blocks[b]
        linears = {name: block.get_submodule(name) for name in names}
        p_capture = calibrate.LinearInputs({name: p_block.get_submodule(name) for name in names})
        b_capture = calibrate.LinearInputs(linears)
        hessians = calibrate.HessianCollector(linears)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = dict.fromkeys(names, 0)
        shared_by: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
        try:
            for i, (h_P, h_b) in enumerate(zip(self.inputs.hidden, private.hidden)):
                mask = private.masks[i]
                p_block(h_P, *self.inputs.args[i], **self.inputs.kwargs[i])
                hessians.next_batch(mask)
                block(h_b, *private.args[i], **private.kwargs[i])
                self._accumulate(b, names, p_capture, b_capture, mask, sums, counts, shared_by)
                p_capture.clear(), b_capture.clear()
        finally:
            p_capture.close(), b_capture.close(), hessians.close()
        return {name: hessians.hessian(name) for name in names}, _scaled(names, sums, counts, shared_by)

    @staticmethod
    def _accumulate(b: int, names: list[str], p_capture: calibrate.LinearInputs, b_capture: calibrate.LinearInputs, mask: torch.Tensor | None,
                    sums: dict, counts: dict, shared_by: dict) -> None:
        """Add one batch's X_Pᵀ X_b [in, in] to each layer's sum, once per pair of inputs (q/k/v share one)."""
        products: dict[tuple[int, int], torch.Tensor] = {}
        for name in names:
            pair = (p_capture.which[name], b_capture.which[name])
            if pair not in products:
                X_b = calibrate.token_rows(b_capture.seen[pair[1]], mask)
                X_P = calibrate.token_rows(p_capture.seen[pair[0]], mask).to(X_b.device)
                if X_P.shape != X_b.shape:
                    raise ValueError(f"P's block {b} feeds {name} inputs of shape {tuple(X_P.shape)}, the "
                                     f"model's {tuple(X_b.shape)}: pass the checkpoint the model was fine-tuned from")
                products[pair] = X_P.t() @ X_b
            if name in sums:
                sums[name] += products[pair]
            else:
                sums[name] = products[pair].clone()
            counts[name] += calibrate.n_tokens(b_capture.seen[pair[1]], mask)
            shared_by[name].append(pair)

    @torch.no_grad()
    def advance(self, b: int) -> None:
        """Move P's hidden states past P's block b: what P's block b+1 reads. Call once block b is fitted."""
        self.inputs.hidden = calibrate.run_block(self.blocks[b], self.inputs)


def input_groups(H_pub: dict[str, torch.Tensor]) -> list[list[str]]:
    """The block's targets in fitting order, grouped by the input they read: layers given one H_pub object by
    HessianCollector (q/k/v, gate/up) read the same tensor. [[q, k, v], [o], [gate, up], [down]] in Llama."""
    groups: dict[int, list[str]] = {}
    for name, H in H_pub.items():
        groups.setdefault(id(H), []).append(name)
    return list(groups.values())


def _scaled(names: list[str], sums: dict[str, torch.Tensor], counts: dict[str, int],
            shared_by: dict[str, list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """C = 2 Σ X_Pᵀ X_b / n per layer, in place of the sums; layers that saw the same pairs of inputs share one."""
    C: dict[tuple, torch.Tensor] = {}
    for name in names:
        key = tuple(shared_by[name])
        if key not in C:
            C[key] = sums[name].mul_(2.0).div_(max(counts[name], 1))
        del sums[name]
    return {name: C[tuple(shared_by[name])] for name in names}
