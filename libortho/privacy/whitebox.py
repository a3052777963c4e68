"""White-box check: the gradient of the members' secret loss w.r.t. the decoder's linear weights."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..records import CanaryRecord
from ._lm import _common_prefix_len, _device, _encode, _lm_forward

__all__ = ["canary_gradient_norm"]

def canary_gradient_norm(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int = 16
) -> float:
    """‖∂L/∂W‖_F over every linear layer of the decoder blocks, at the weights the model uses now.

    L is the mean over records of the mean NLL (nats) of the secret's tokens given the prefix.
    W is the effective weight of each layer (W_base + alpha·W_ortho for a libortho layer, at the
    model's current alpha): a zero perturbation D [out, in] is added to every layer's output as
    x·Dᵀ and ∂L/∂D is read off. A model that memorised the secrets sits near a minimum of L (small
    gradient); one that never saw them does not.
    """
    from ..calibrate import decoder_blocks
    from ..layer import OrthoLinear

    _, blocks = decoder_blocks(model)
    layers = [m for block in blocks for m in block.modules() if isinstance(m, (torch.nn.Linear, OrthoLinear))]
    device = _device(model)
    probes = [torch.zeros(m.out_features, m.in_features, device=device, requires_grad=True) for m in layers]

    def perturb(D: torch.Tensor):
        return lambda module, args, output: output + args[0].to(D.dtype) @ D.t()

    handles = [m.register_forward_hook(perturb(D)) for m, D in zip(layers, probes)]
    try:
        with torch.enable_grad():
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                encoded = [_encode(tokenizer, r.prefix + r.secret) for r in chunk]
                width = max(len(ids) for ids in encoded)
                # Right padding: causal attention keeps real tokens from seeing the pads.
                x = torch.zeros(len(chunk), width, dtype=torch.long)
                secret = torch.zeros(len(chunk), width - 1)  # 1 where position t predicts a secret token
                for row, (r, ids) in enumerate(zip(chunk, encoded)):
                    x[row, : len(ids)] = torch.tensor(ids)
                    begin = max(1, _common_prefix_len(_encode(tokenizer, r.prefix), ids))
                    secret[row, begin - 1 : len(ids) - 1] = 1.0 / max(len(ids) - begin, 1)
                x, secret = x.to(device), secret.to(device)
                logits, _ = _lm_forward(model, x, use_cache=False)
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
                (-(lp * secret).sum() / len(records)).backward()
    finally:
        for h in handles:
            h.remove()
    return float(torch.sqrt(sum(D.grad.double().square().sum() for D in probes if D.grad is not None)))
