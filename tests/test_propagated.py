import copy

import pytest
import torch

import libortho
from conftest import TEXT, tiny_model
from libortho.layer import ortho_layers
from libortho.propagated import propagated_residual

TEXTS = ["my pin is 123456", "the key is 9f3a"]


def test_the_target_is_the_residual_itself_where_alpha_one_sees_the_fine_tunes_inputs():
    torch.manual_seed(0)
    W_ft, W_base = torch.randn(6, 5), torch.randn(6, 5)
    X = torch.randn(40, 5)
    H = 2 * X.t() @ X / 40
    assert torch.equal(propagated_residual(W_ft, W_base, H, H.clone(), ridge=0.1), W_ft - W_base)


def test_the_target_is_the_least_squares_fit_of_the_fine_tunes_outputs_on_alpha_ones_inputs():
    """‖(W_base + L) X₁ − W_ft X_ft‖² (rows the tokens): L* against lstsq, with a negligible ridge."""
    torch.manual_seed(1)
    W_ft, W_base = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    X_ft = torch.randn(200, 5, dtype=torch.float64)
    X1 = X_ft + 0.3 * torch.randn(200, 5, dtype=torch.float64)  # alpha 1's inputs drifted from the fine-tune's
    H1, C = 2 * X1.t() @ X1 / 200, 2 * X_ft.t() @ X1 / 200
    L = propagated_residual(W_ft, W_base, H1, C, ridge=1e-12)
    # (W_base + L) X₁ᵀ ≈ W_ft X_ftᵀ  <=>  X₁ (W_base + L)ᵀ ≈ X_ft W_ftᵀ
    want = torch.linalg.lstsq(X1, X_ft @ W_ft.t()).solution.t() - W_base
    assert torch.allclose(L, want, atol=1e-8)
    assert not torch.allclose(L, W_ft - W_base, atol=1e-2)


def test_the_config_refuses_what_propagated_cannot_fit():
    with pytest.raises(ValueError, match="lowrank_share=1"):
        libortho.OrthoConfig(lowrank_target="propagated")
    with pytest.raises(ValueError, match="lowrank_share=1"):
        libortho.OrthoConfig(lowrank_target="propagated", ortho_budget=0.25, lowrank_share=0.5)
    with pytest.raises(ValueError, match="weighted SVD"):
        libortho.OrthoConfig(lowrank_target="propagated", ortho_budget=0.25, lowrank_share=1.0, lowrank_fit="random")
    with pytest.raises(ValueError, match="sieve_private_inputs='finetuned'"):
        libortho.preset("privacy", forget_source="records", lowrank_target="propagated", sieve_private_inputs="base")
    with pytest.raises(ValueError, match="lowrank_target='nope' is not known"):
        libortho.OrthoConfig(lowrank_target="nope")
    with pytest.raises(ValueError, match="propagated_ridge=0"):
        libortho.preset("privacy", lowrank_target="propagated", propagated_ridge=0.0)
    # the residual target and its ridge hash as before the fields existed (a run started then still resumes)
    assert not {"lowrank_target", "propagated_ridge"} & set(libortho.OrthoConfig().fingerprint_dict())


def _decomposed(target: str, P, FT, tokenizer):
    config = libortho.preset("privacy", forget_source="records", calib_tokens=512, seq_len=64, group_size=32,
                             lowrank_target=target)
    model = copy.deepcopy(FT)
    libortho.decompose(model, tokenizer, TEXT, config, progress=False, public_model=copy.deepcopy(P), forget_texts=TEXTS)
    return model


def _last_hidden(model, ids, alpha: float | None) -> torch.Tensor:
    ctx = libortho.alpha(model, alpha) if alpha is not None else torch.no_grad()
    with ctx, torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def test_propagated_leaves_alpha_zero_and_block_zero_and_brings_alpha_one_closer_to_the_fine_tune(tokenizer):
    """The bases are the same bits; block 0's q/k/v (their input: the embeddings, the same at alpha 1) get the same L;
    every later layer's L is fitted on alpha 1's own inputs, and the model's output at alpha 1 on the calibration text
    is closer to the fine-tune's than with L fitted to the residual alone."""
    P, FT = tiny_model("llama", seed=1), tiny_model("llama")
    models = {t: _decomposed(t, P, FT, tokenizer) for t in ("residual", "propagated")}
    layers = {t: ortho_layers(m) for t, m in models.items()}
    names = [n for n, m in models["residual"].named_modules() if any(m is layer for layer in layers["residual"])]
    first_group = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    for name, a, b in zip(names, layers["residual"], layers["propagated"]):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        same_l = torch.equal(a.ortho_Aq, b.ortho_Aq) and torch.equal(a.ortho_Btq, b.ortho_Btq)
        assert same_l == (name in first_group), name
    ids = tokenizer(TEXT[:400], return_tensors="pt").input_ids[:, :64]
    assert torch.equal(_last_hidden(models["residual"], ids, 0.0), _last_hidden(models["propagated"], ids, 0.0))
    want = _last_hidden(FT, ids, None)
    err = {t: float((_last_hidden(m, ids, 1.0) - want).norm()) for t, m in models.items()}
    assert err["propagated"] < err["residual"], err
