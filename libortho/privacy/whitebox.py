"""White-box check: the gradient of the members' secret loss w.r.t. the decoder's linear weights."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..hf_model import decoder_blocks, module_device
from ..records import CanaryRecord
from .forward import TEXT_BATCH_SIZE, common_prefix_len, encode, lm_forward

__all__ = ["canary_gradient_norm"]

PROBE_BYTES = 128 * 2**20  # probes (and their gradients) held at once; a layer group's share


def canary_gradient_norm(
    model: torch.nn.Module, tokenizer: Any, records: Sequence[CanaryRecord], batch_size: int = TEXT_BATCH_SIZE
) -> float:
    """‖∂L/∂W‖_F over every linear layer of the decoder blocks, at the weights the model uses now.

    L is the mean over records of the mean NLL (nats) of the secret's tokens given the prefix.
    W is the effective weight of each layer (W_base + alpha·W_ortho for a libortho layer, at the
    model's current alpha): a zero perturbation D [out, in] is added to every layer's output as
    x·Dᵀ and ∂L/∂D is read off. A model that memorised the secrets sits near a minimum of L (small
    gradient); one that never saw them does not. The layers are probed in groups of about
    PROBE_BYTES of fp32 perturbations, one forward and backward pass over the records per group,
    so that the probes and their gradients never need the model's whole size at once.
    """
    from ..layer import OrthoLinear

    _, blocks = decoder_blocks(model)
    layers = [m for block in blocks for m in block.modules() if isinstance(m, (torch.nn.Linear, OrthoLinear))]
    batches = [_secret_batch(tokenizer, records[i : i + batch_size], module_device(model)) for i in range(0, len(records), batch_size)]
    square = sum(_probe_group(model, group, batches, len(records)) for group in _layer_groups(layers))
    return float(torch.sqrt(torch.as_tensor(square, dtype=torch.float64)))


def _layer_groups(layers: list[torch.nn.Module]) -> list[list[torch.nn.Module]]:
    groups: list[list[torch.nn.Module]] = [[]]
    size = 0
    for m in layers:
        nbytes = 4 * m.out_features * m.in_features
        if groups[-1] and size + nbytes > PROBE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(m)
        size += nbytes
    return groups


def _secret_batch(tokenizer: Any, chunk: Sequence[CanaryRecord], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], weights [B, T-1]): right-padded record texts and, at each position that
    predicts a secret token, 1 / that record's number of secret tokens."""
    encoded = [encode(tokenizer, r.prefix + r.secret) for r in chunk]
    width = max(len(ids) for ids in encoded)
    # Right padding: causal attention keeps real tokens from seeing the pads.
    x = torch.zeros(len(chunk), width, dtype=torch.long)
    secret = torch.zeros(len(chunk), width - 1)
    for row, (r, ids) in enumerate(zip(chunk, encoded)):
        x[row, : len(ids)] = torch.tensor(ids)
        begin = max(1, common_prefix_len(encode(tokenizer, r.prefix), ids))
        secret[row, begin - 1 : len(ids) - 1] = 1.0 / max(len(ids) - begin, 1)
    return x.to(device), secret.to(device)


def _probe_group(model: torch.nn.Module, layers: list[torch.nn.Module], batches, n_records: int) -> torch.Tensor:
    """Σ ‖∂L/∂D‖² (float64) over this group's layers."""
    device = module_device(model)
    probes = [torch.zeros(m.out_features, m.in_features, device=device, requires_grad=True) for m in layers]

    def perturb(D: torch.Tensor):
        return lambda module, args, output: output + args[0].to(D.dtype) @ D.t()

    handles = [m.register_forward_hook(perturb(D)) for m, D in zip(layers, probes)]
    try:
        with torch.enable_grad():
            for x, secret in batches:
                logits, _ = lm_forward(model, x, use_cache=False)
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
                (-(lp * secret).sum() / n_records).backward()
    finally:
        for h in handles:
            h.remove()
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return sum((D.grad.double().square().sum() for D in probes if D.grad is not None), zero).cpu()
