"""The ortho stream's two parts under one budget in bytes: the sparse S and the low-rank L = B·A.

    Y = W_base X + alpha (S X + B (A X))

The budget is a fraction of the base's bytes (`OrthoConfig.ortho_budget`): the packed codes plus
the fp16 scales and zeros of every decomposed layer. `lowrank_share` of it is L's, the rest S's
(the bytes L leaves unspent, in the rounding of ranks to whole steps or at full rank, go to S, unless
`lowrank_share` is 1: no sparse part):

    bytes(L) = Σ_layers 2 r (out + in)          (fp16 B and A; lowrank_bits 8 / 4: lowrank.rank_bytes)
    bytes(S) = Σ_layers 6 nnz + 4 (out + 1)     (fp16 value + int32 column per entry, int32 row pointers)

Ranks are handed out across layers in steps of `lowrank_step`, greedily by the drop of the layer
objective tr((R − L) H (R − L)ᵀ) per byte, read off the H-weighted spectrum of each layer's residual
(lowrank.allocate_ranks; `lowrank_alloc="global"`), or each layer gets the rank its own share of
the bytes buys ("layer"); the same ranks serve every fit, so the fits are compared at equal bytes.
The rest of the bytes become a global sparse ratio, nnz / Σ out·in, for the existing sieve.

Order (`lowrank_first`): L is fitted to R, then the sieve chooses and refits S on what L leaves,
R − L; or the sieve runs first and L is fitted to R − S. The fits (`lowrank_fit`):
  svd     (b) the H-weighted truncated SVD of the residual it is given, H = the sieve's curvature;
  edit    (a) the forget edit Δ = W_ft − W* in the generalized eigenbasis of (H_priv, H')
          (needs a forget source with texts; falls back to (b) where a layer has no edit);
  random  (c) the control: the best L whose rows lie in a random subspace of the same rank.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .config import OrthoConfig
from .csr import OrthoCSR
from .lowrank import (
    LowRank, allocate_ranks, code_factors, edit_eigenbasis, random_subspace, rank_bytes, rank_for_bytes, step_gains,
    weighted_svd, weighted_svd_spectrum,
)
from .packing import n_groups, packed_bytes

SPARSE_ENTRY_BYTES = 6  # fp16 value + int32 column
LOWRANK_VALUE_BYTES = 2  # fp16


@dataclass
class OrthoParts:
    """One layer's ortho stream: the sparse part S (CSR) and the low-rank part L (rank 0 for none)."""

    sparse: OrthoCSR
    lowrank: LowRank


def base_bytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Stored bytes of one layer's base [out, in]: packed codes + fp16 scales and zeros."""
    out_features, in_features = shape
    packed = out_features * packed_bytes(in_features, bits)
    return packed + 2 * 2 * out_features * n_groups(in_features, group_size)


def sparse_bytes(nnz: int, out_features: int) -> int:
    return SPARSE_ENTRY_BYTES * nnz + 4 * (out_features + 1)


def stored_bytes(layers) -> dict:
    """{base, sparse, lowrank}: the bytes the OrthoLinear `layers` store in each part, as counted above."""
    out = dict(base=0, sparse=0, lowrank=0)
    for layer in layers:
        out["base"] += base_bytes((layer.out_features, layer.in_features), layer.bits, layer.group_size)
        out["sparse"] += sparse_bytes(layer.ortho_nnz, layer.out_features)
        out["lowrank"] += layer.ortho_rank * rank_bytes(layer.out_features, layer.in_features, layer.lowrank_bits)
    return out


def split_budget(parts: dict, config: OrthoConfig) -> tuple[dict, float, dict]:
    """(rank per layer, global sparse ratio, the split's bytes) for `config.ortho_budget`."""
    return split_for_shapes({key: tuple(p.R.shape) for key, p in parts.items()}, config, parts)


def split_for_shapes(shapes: dict, config: OrthoConfig, parts: dict | None = None) -> tuple[dict, float, dict]:
    """split_budget from the layers' [out, in] shapes alone; `parts` (with R and H) only for the global
    allocator, which reads each layer's spectrum."""
    total_base = sum(base_bytes(s, config.bits, config.group_size) for s in shapes.values())
    budget = config.ortho_budget * total_base
    pointers = sum(4 * (s[0] + 1) for s in shapes.values())  # the CSR row pointers are stored even when empty
    lowrank_budget = int(config.lowrank_share * max(0.0, budget - pointers))
    if lowrank_budget == 0:
        ranks = {k: 0 for k in parts}
    elif config.lowrank_alloc == "layer":
        ranks = _per_layer(shapes, lowrank_budget / total_base, config)
    else:
        if parts is None:
            raise ValueError("lowrank_alloc='global' reads every layer's residual: pass the parts")
        ranks = _allocate(parts, shapes, lowrank_budget, config)
    lowrank_used = sum(ranks[k] * rank_bytes(*s, config.lowrank_bits) for k, s in shapes.items())
    sparse_budget = 0.0 if config.lowrank_share == 1.0 else budget - pointers - lowrank_used
    nnz = max(0, int(sparse_budget // SPARSE_ENTRY_BYTES))
    n_weights = sum(s[0] * s[1] for s in shapes.values())
    bytes_ = dict(base=total_base, budget=int(budget), lowrank=lowrank_used, sparse=SPARSE_ENTRY_BYTES * nnz + pointers)
    return ranks, min(1.0, nnz / n_weights), bytes_


def _per_layer(shapes: dict, fraction: float, config: OrthoConfig) -> dict:
    """Each layer the rank its own `fraction` of its base's bytes buys, in whole steps."""
    ranks = {}
    for key, s in shapes.items():
        nbytes = fraction * base_bytes(s, config.bits, config.group_size)
        r = rank_for_bytes(*s, int(nbytes), config.lowrank_bits)
        ranks[key] = r - r % config.lowrank_step if r >= config.lowrank_step else r
    return ranks


def _allocate(parts: dict, shapes: dict, budget_bytes: int, config: OrthoConfig) -> dict:
    gains = {key: step_gains(weighted_svd_spectrum(p.R, _curvature(p), config.damp), config.lowrank_step)
             for key, p in parts.items()}
    costs = {key: rank_bytes(*s, config.lowrank_bits) for key, s in shapes.items()}
    ranks = allocate_ranks(gains, costs, budget_bytes, config.lowrank_step)
    return {key: min(r, *shapes[key]) for key, r in ranks.items()}


def _curvature(p) -> torch.Tensor:
    """The layer's metric for L: the sieve's curvature, or the identity without calibration."""
    return p.H if p.H is not None else torch.eye(p.R.shape[1], device=p.R.device)


def fit_lowrank(p, E: torch.Tensor, rank: int, config: OrthoConfig, generator: torch.Generator) -> LowRank:
    """One layer's L of `rank` fitted to the residual E [out, in] by config.lowrank_fit, as the codes of
    config.lowrank_bits when below 16."""
    if rank == 0:
        return LowRank.empty(*E.shape)
    if config.lowrank_fit == "random":
        L = random_subspace(E, _curvature(p), rank, generator, config.damp)
    elif config.lowrank_fit == "edit" and p.edit is not None:
        delta, H_priv, H_prime = p.edit
        L = edit_eigenbasis(delta, H_priv, H_prime, rank, config.damp)
    else:
        L = weighted_svd(E, _curvature(p), rank, config.damp)
    return L if config.lowrank_bits == 16 else code_factors(L, E, _curvature(p), config.lowrank_bits, config.damp)


def split_model(parts: dict, config: OrthoConfig, sieve) -> tuple[dict, dict]:
    """Every layer's OrthoParts under config.ortho_budget, and the split's bytes.

    sieve(parts, config) -> {key: OrthoCSR} is the sparse stage (decompose.sieve_model), run on
    what L leaves (or first, with lowrank_first=False) with the ratio the split leaves it."""
    ranks, ratio, bytes_ = split_budget(parts, config)
    sparse_config = replace(config, ortho_ratio=ratio, budget="global", ortho_budget=None)
    generator = torch.Generator().manual_seed(config.seed)
    ortho_dtype = getattr(torch, config.ortho_dtype)
    if config.lowrank_first:
        lowranks = {key: fit_lowrank(p, p.R, ranks[key], config, generator) for key, p in parts.items()}
        left = _LeftAfterLowRank(parts, lowranks)
        sparse = sieve(left, sparse_config)
    else:
        sparse = sieve(parts, sparse_config)
        lowranks = {key: fit_lowrank(p, p.R - sparse[key].to_dense().float(), ranks[key], config, generator)
                    for key, p in parts.items()}
    stored = {key: _stored(lowranks[key], ortho_dtype) for key in parts}
    bytes_["sparse"] = sum(sparse_bytes(sparse[k].nnz, sparse[k].shape[0]) for k in parts)
    bytes_["ranks"] = {f"{b}.{name}": r for (b, name), r in ranks.items()}
    return {key: OrthoParts(sparse[key], stored[key]) for key in parts}, bytes_


class _LeftAfterLowRank(Mapping):
    """{key: the layer's parts with R − B·A}, computed when asked for: dense and as large as the weights, so the
    sieve's passes see one layer's at a time rather than every layer's at once."""

    def __init__(self, parts: Mapping, lowranks: dict) -> None:
        self.parts, self.lowranks = parts, lowranks

    def __getitem__(self, key):
        p = self.parts[key]
        return replace(p, R=p.R - self.lowranks[key].to_dense())

    def __iter__(self):
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


class LayerFinisher:
    """Each layer's ortho stream fitted as soon as its base is done (decompose's finish stage), for a
    config whose streams are layer-local (decompose.layer_local): per-layer ranks with no sparse part, or
    a sparse-only per-layer budget. Gives what split_model / the sieve give for the same layers, fitted in
    the same order, without holding any other layer's residual.

    shapes: [out, in] of every layer, known before any fit (the ranks depend on the total bytes);
    sieve_layer(parts, config) -> OrthoCSR: one layer's sparse stage (decompose.sieve_layer)."""

    def __init__(self, config: OrthoConfig, shapes: dict, sieve_layer) -> None:
        self.config, self.shapes, self.sieve_layer = config, shapes, sieve_layer
        self.ranks, self.split = {}, {}
        if config.ortho_budget is not None:
            self.ranks, _, self.split = split_for_shapes(shapes, config)
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, key, p) -> "OrthoCSR | OrthoParts":
        if self.config.ortho_budget is None:
            return self.sieve_layer(p, self.config)
        if self.config.lowrank_share != 1.0:
            raise ValueError("a layer-local split has no sparse part: lowrank_share must be 1")
        lowrank = _stored(fit_lowrank(p, p.R, self.ranks[key], self.config, self.generator), getattr(torch, self.config.ortho_dtype))
        return OrthoParts(OrthoCSR.empty(tuple(p.R.shape), getattr(torch, self.config.ortho_dtype)), lowrank)

    def bytes(self, orthos: dict) -> dict:
        """The split's bytes, as split_model reports them."""
        out = dict(self.split)
        out["sparse"] = sum(sparse_bytes(o.sparse.nnz, o.sparse.shape[0]) for o in orthos.values())
        out["ranks"] = {f"{b}.{name}": r for (b, name), r in self.ranks.items()}
        return out


def _stored(L: LowRank, dtype: torch.dtype) -> LowRank:
    """L as the layer stores it: B and A in the ortho dtype, or its codes (kept as they are)."""
    if L.codes is not None:
        return L
    return LowRank(L.B.to(dtype).contiguous(), L.A.to(dtype).contiguous())
