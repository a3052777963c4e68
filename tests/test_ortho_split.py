"""The ortho stream's two parts under one byte budget (ortho_split.py), on a tiny Llama."""
import copy
import dataclasses

import pytest
import torch

import libortho
from libortho.layer import ortho_layers
from libortho.ortho_split import LOWRANK_VALUE_BYTES, sparse_bytes
from conftest import TEXT, tiny_model

BASE = dict(calib_tokens=1024, seq_len=128, group_size=32)


@pytest.fixture(scope="module")
def finetuned():
    return tiny_model("llama")


def _decomposed(model, tokenizer, **overrides):
    model = copy.deepcopy(model)
    stats = libortho.decompose(model, tokenizer, TEXT, libortho.OrthoConfig(**BASE, **overrides), progress=False)
    return model, stats


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}


def test_full_rank_and_no_sparse_budget_give_back_the_fine_tuned_weights(finetuned, tokenizer):
    W = _weights(finetuned)
    model, stats = _decomposed(finetuned, tokenizer, ortho_budget=100.0, lowrank_share=1.0, lowrank_step=8)
    assert stats.n_ortho == 0
    for name, layer in ((n, m) for n, m in model.named_modules() if m in ortho_layers(model)):
        assert layer.ortho_rank == min(layer.in_features, layer.out_features)
        restored = layer.base_weight() + layer.ortho_weight()
        assert torch.allclose(restored, W[name], atol=2e-3, rtol=1e-2), name  # fp16 B and A: rounding only


def test_the_split_keeps_to_its_bytes_and_alpha_zero_is_untouched(finetuned, tokenizer):
    plain, _ = _decomposed(finetuned, tokenizer)
    model, stats = _decomposed(finetuned, tokenizer, ortho_budget=0.25, lowrank_share=0.5, lowrank_step=8,
                               lowrank_alloc="global")
    split = stats.ortho_bytes
    assert split["lowrank"] <= split["budget"] // 2 and split["lowrank"] + split["sparse"] <= split["budget"]
    layers = ortho_layers(model)
    assert any(layer.ortho_rank > 0 for layer in layers) and all(layer.ortho_rank % 8 == 0 for layer in layers)
    stored = sum(LOWRANK_VALUE_BYTES * l.ortho_rank * (l.in_features + l.out_features) for l in layers)
    stored += sum(sparse_bytes(l.ortho_nnz, l.out_features) for l in layers)
    assert stored == split["lowrank"] + split["sparse"]
    for a, b in zip(ortho_layers(plain), layers):  # the base is the same bits as without a budget
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(plain, 0.0), libortho.alpha(model, 0.0), torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


def test_the_weighted_svd_beats_the_random_control_on_the_layer_objective_at_equal_ranks(finetuned, tokenizer):
    """Σ_layers tr((R − L) H (R − L)ᵀ): the objective (b) minimises, against the control's best L in
    a random subspace of the same rank (the same bytes), on the tiny model's real residuals."""
    from libortho.decompose import quantize_model, sieve_model
    from libortho.plan import plan_decomposition
    from libortho.ortho_split import split_model

    config = libortho.OrthoConfig(**BASE, ortho_budget=0.5, lowrank_share=1.0, lowrank_step=8)
    model = copy.deepcopy(finetuned)
    parts, _ = quantize_model(model, plan_decomposition(model, tokenizer, TEXT, config), config, progress=False)
    objective, ranks = {}, {}
    for fit in ("svd", "random"):
        orthos, split = split_model(parts, dataclasses.replace(config, lowrank_fit=fit), sieve_model)
        ranks[fit] = split["ranks"]
        objective[fit] = sum(float(torch.sum(((E := p.R - orthos[k].lowrank.to_dense()) @ p.H) * E))
                             for k, p in parts.items())
    assert ranks["svd"] == ranks["random"] and any(ranks["svd"].values())
    assert objective["svd"] < objective["random"]


def test_per_layer_ranks_spend_each_layers_share(finetuned, tokenizer):
    from libortho.ortho_split import base_bytes

    model, stats = _decomposed(finetuned, tokenizer, ortho_budget=0.5, lowrank_share=1.0, lowrank_step=4)
    split = stats.ortho_bytes
    assert split["lowrank"] + split["sparse"] <= split["budget"]
    for layer in ortho_layers(model):
        share = 0.5 * base_bytes((layer.out_features, layer.in_features), layer.bits, layer.group_size)
        cost = LOWRANK_VALUE_BYTES * (layer.in_features + layer.out_features)
        # whole steps of 4 (or less than one step) within the layer's share, a little less than half its
        # base: the row pointers are paid first
        assert layer.ortho_rank % 4 == 0 or layer.ortho_rank < 4
        assert layer.ortho_rank * cost <= share < (layer.ortho_rank + 8) * cost


def _shapes_as_parts(shapes):
    from types import SimpleNamespace

    return {(0, name): SimpleNamespace(R=torch.empty(shape)) for name, shape in shapes.items()}


SMOL_SHAPES = {"q": (576, 576), "k": (192, 576), "gate": (1536, 576), "down": (576, 1536)}


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_bytes_the_ranks_leave_unspent_go_to_the_sparse_part(share):
    from libortho.ortho_split import SPARSE_ENTRY_BYTES, split_budget

    config = libortho.OrthoConfig(ortho_budget=0.25, lowrank_share=share, lowrank_step=16)
    _, ratio, split = split_budget(_shapes_as_parts(SMOL_SHAPES), config)
    assert split["lowrank"] <= share * split["budget"]
    # the whole budget is spent, to within one sparse entry
    assert split["budget"] - SPARSE_ENTRY_BYTES < split["lowrank"] + split["sparse"] <= split["budget"]
    assert ratio > 0


def test_a_low_rank_share_of_one_means_no_sparse_part():
    from libortho.ortho_split import split_budget

    config = libortho.OrthoConfig(ortho_budget=0.25, lowrank_share=1.0, lowrank_step=16)
    ranks, ratio, split = split_budget(_shapes_as_parts(SMOL_SHAPES), config)
    assert ratio == 0.0 and split["sparse"] == sum(4 * (s[0] + 1) for s in SMOL_SHAPES.values())  # row pointers only
    # the row pointers (11536 B) are paid first: each layer gets (0.25·1244160 − 11536) / 1244160 = 24.07 % of its
    # base; q: 44925 B buys 19 ranks of 2304 B, kept in whole steps of 16; k: 14975 B buys 9 of 1536 B, less than a step
    assert ranks[(0, "q")] == 16 and ranks[(0, "k")] == 9


def test_stored_bytes_count_what_each_part_stores(finetuned, tokenizer):
    from libortho.ortho_split import base_bytes, stored_bytes

    model, stats = _decomposed(finetuned, tokenizer, ortho_budget=0.25, lowrank_share=0.5, lowrank_step=4)
    counted = stored_bytes(ortho_layers(model))
    assert counted["lowrank"] == stats.ortho_bytes["lowrank"] and counted["sparse"] == stats.ortho_bytes["sparse"]
    assert counted["base"] == stats.ortho_bytes["base"]
    layer = ortho_layers(model)[0]
    assert base_bytes((layer.out_features, layer.in_features), 4, 32) == layer.qweight.numel() + 4 * layer.scales.numel()


def test_coded_factors_keep_to_the_bytes_leave_alpha_zero_and_restore_more_at_equal_bytes(finetuned, tokenizer):
    """lowrank_bits 4: about 3.6x the ranks of fp16 for the same bytes; the base is the same bits; alpha 1
    is the codes' L exactly; and on the tiny model's real residuals the coded L leaves less of the layer
    objective tr((R − S − L) H (R − S − L)ᵀ) than the fp16 L of the same bytes."""
    from libortho.decompose import quantize_model, sieve_model
    from libortho.plan import plan_decomposition
    from libortho.lowrank import rank_bytes
    from libortho.ortho_split import split_model, stored_bytes

    fp16, _ = _decomposed(finetuned, tokenizer, ortho_budget=0.5, lowrank_share=1.0)
    coded, stats = _decomposed(finetuned, tokenizer, ortho_budget=0.5, lowrank_share=1.0, lowrank_bits=4)
    assert stored_bytes(ortho_layers(coded))["lowrank"] == stats.ortho_bytes["lowrank"] <= stats.ortho_bytes["budget"]
    for a, b in zip(ortho_layers(fp16), ortho_layers(coded)):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        assert b.lowrank_bits == 4 and b.ortho_A.numel() == 0  # the kernels see no float factors
        assert b.ortho_rank >= 3 * a.ortho_rank > 0
        assert rank_bytes(b.out_features, b.in_features, 4) * 3 < rank_bytes(b.out_features, b.in_features, 16)
        x = torch.randn(5, b.in_features)
        B, A = b.lowrank_factors()
        with libortho.alpha(coded, 1.0):
            want = x @ (b.base_weight() + B @ A).t()
            assert torch.allclose(b(x), want, atol=1e-5, rtol=1e-5)
    ids = tokenizer(TEXT[:64], return_tensors="pt").input_ids
    with libortho.alpha(fp16, 0.0), libortho.alpha(coded, 0.0), torch.no_grad():
        assert torch.equal(fp16(ids).logits, coded(ids).logits)

    model = copy.deepcopy(finetuned)
    config = libortho.OrthoConfig(**BASE, ortho_budget=0.5, lowrank_share=1.0)
    parts, _ = quantize_model(model, plan_decomposition(model, tokenizer, TEXT, config), config, progress=False)
    left = {}
    for bits in (16, 4):
        orthos, _ = split_model(parts, dataclasses.replace(config, lowrank_bits=bits), sieve_model)
        left[bits] = sum(float(torch.sum(((E := p.R - orthos[k].lowrank.to_dense()) @ p.H) * E)) for k, p in parts.items())
    assert left[4] < left[16]
