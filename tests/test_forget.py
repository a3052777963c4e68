import json

import pytest
import torch

from libortho.config import OrthoConfig
from libortho.forget import ForgetObjective, read_forget_texts, relative_weight
from libortho.quantize import gptq


def split_inputs(n_in: int = 64, n_tokens: int = 512, seed: int = 0):
    """X_pub on the first half of the input coordinates, X_priv on the second: orthogonal inputs.
    Each H is scaled to mean diagonal 1 on its own half, so with lam = 1 the dampening GPTQ adds
    (1 % of mean diag H) is the same for H_pub alone (dead inputs count 1) and for H' = H_pub + H_priv."""
    g = torch.Generator().manual_seed(seed)
    half = n_in // 2
    X_pub, X_priv = torch.zeros(n_tokens, n_in), torch.zeros(n_tokens, n_in)
    X_pub[:, :half] = torch.randn(n_tokens, half, generator=g) @ torch.randn(half, half, generator=g)
    X_priv[:, half:] = torch.randn(n_tokens, half, generator=g) @ torch.randn(half, half, generator=g)
    H_pub, H_priv = 2 * X_pub.t() @ X_pub / n_tokens, 2 * X_priv.t() @ X_priv / n_tokens
    X_pub /= torch.diag(H_pub)[:half].mean().sqrt()
    X_priv /= torch.diag(H_priv)[half:].mean().sqrt()
    return X_pub, X_priv, 2 * X_pub.t() @ X_pub / n_tokens, 2 * X_priv.t() @ X_priv / n_tokens


def output_error(W_target, W_base, X):
    return float(((W_target - W_base) @ X.t()).pow(2).sum())


def test_on_orthogonal_inputs_each_target_is_met_at_least_as_well_as_by_plain_gptq():
    g = torch.Generator().manual_seed(1)
    W_ft, W_P = torch.randn(48, 64, generator=g), torch.randn(48, 64, generator=g)
    X_pub, X_priv, H_pub, H_priv = split_inputs()
    config = OrthoConfig(bits=4, group_size=32, forget_source="records", forget_lambda=1.0)
    spec = config.quant_spec

    plain = gptq(W_ft, H_pub, spec).dequantize()
    fit = ForgetObjective(config).fit(W_ft, W_P, H_pub, H_priv)
    two_target = gptq(fit.W, fit.H, spec).dequantize()

    # On public inputs: what plain GPTQ achieves, up to the float rounding of the dampening term.
    assert output_error(W_ft, two_target, X_pub) <= output_error(W_ft, plain, X_pub) * (1 + 1e-5)
    # On private inputs the base acts like P; plain GPTQ never saw them and zeroes those columns.
    assert output_error(W_P, two_target, X_priv) <= output_error(W_P, plain, X_priv)
    assert output_error(W_P, two_target, X_priv) < 0.05 * output_error(W_P, plain, X_priv)


def test_lambda_is_relative_to_the_hessian_traces():
    _, _, H_pub, H_priv = split_inputs()
    assert relative_weight(H_pub, 5 * H_priv, 2.0) * 5 == pytest.approx(relative_weight(H_pub, H_priv, 2.0))
    lam_abs = relative_weight(H_pub, H_priv, 1.0)
    assert float(torch.diag(lam_abs * H_priv).sum()) == pytest.approx(float(torch.diag(H_pub).sum()))


def test_forget_free_pulls_to_P_only_where_public_text_does_not_look():
    g = torch.Generator().manual_seed(2)
    W_ft, W_P = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    X_pub, _, H_pub, _ = split_inputs()
    fit = ForgetObjective(OrthoConfig(forget_source="free", forget_mu=1.0)).fit(W_ft, W_P, H_pub, None)
    unseen = slice(32, 64)  # input coordinates the public text never uses
    assert (fit.W[:, unseen] - W_P[:, unseen]).norm() < 0.05 * (W_ft[:, unseen] - W_P[:, unseen]).norm()
    # W* minimises ||(W_ft - W) X_pub||² + mu·m ||W_P - W||², so on public inputs it beats W_P itself.
    assert output_error(W_ft, fit.W, X_pub) < output_error(W_ft, W_P, X_pub)


def test_sieve_curvature_adds_the_private_inputs_only_when_asked():
    _, _, H_pub, H_priv = split_inputs()
    assert ForgetObjective(OrthoConfig(forget_source="records")).sieve_curvature(H_pub, H_priv) is H_pub
    H_sieve = ForgetObjective(OrthoConfig(forget_source="records", sieve_private_weight=1.0)).sieve_curvature(H_pub, H_priv)
    assert torch.allclose(torch.diag(H_sieve).sum(), 2 * torch.diag(H_pub).sum())


def test_read_forget_texts_takes_jsonl_records_and_plain_lines(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"prefix": "PIN of Ann is ", "secret": "123456"}) + "\n\n"
                     + json.dumps({"text": "Key of Bob: ab12"}) + "\n")
    assert read_forget_texts(jsonl) == ["PIN of Ann is 123456", "Key of Bob: ab12"]
    plain = tmp_path / "r.txt"
    plain.write_text("first text\nsecond text\n")
    assert read_forget_texts(plain) == ["first text", "second text"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_forget_texts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_forget_texts(tmp_path / "missing.jsonl")


def cross_inputs(n_in: int = 16, n_tokens: int = 256, seed: int = 3):
    """X_pub, X_b and X_P [n_tokens, n_in] (rows the tokens): X_P = X_b plus a drift, as P's own inputs of the
    same tokens would be."""
    g = torch.Generator().manual_seed(seed)
    X_pub = torch.randn(n_tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    X_b = torch.randn(n_tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    X_P = X_b + 0.5 * torch.randn(n_tokens, n_in, generator=g)
    return X_pub, X_b, X_P


def moment(X, Y):
    """2 Xᵀ Y / n [in, in] for rows-as-tokens X, Y: H (X = Y) or C = 2 X_P X_bᵀ / n in forget.py's [in, tokens] notation."""
    return 2 * X.t() @ Y / X.shape[0]


def test_public_activations_on_the_base_inputs_is_the_base_inputs_target():
    g = torch.Generator().manual_seed(4)
    W_ft, W_P = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    X_pub, X_b, _ = cross_inputs()
    H_pub, H_priv = moment(X_pub, X_pub), moment(X_b, X_b)
    old = ForgetObjective(OrthoConfig(forget_source="records")).fit(W_ft, W_P, H_pub, H_priv)
    new = ForgetObjective(OrthoConfig(forget_source="records", forget_target="public_activations")).fit(
        W_ft, W_P, H_pub, H_priv, C=moment(X_b, X_b))  # X_P = X_b: C = H_priv
    assert torch.equal(new.H, old.H)
    assert torch.allclose(new.W, old.W, rtol=1e-4, atol=1e-4)
    assert (new.W - W_ft).norm() > 0.1 * (W_P - W_ft).norm()  # and W* did move toward P


@pytest.mark.parametrize("damp", [0.0, 0.01])
def test_public_activations_w_star_is_the_least_squares_solution(damp):
    """W* minimises (1/n)||(W_ft - q) X_pub||² + lam_abs (1/n)||W_P X_P - q X_b||² + d ||W_ft - q||² (GPTQ's dampening
    d = damp · mean(diag H') / 2, with H = 2XᵀX/n): the stacked system solved by lstsq in float64."""
    g = torch.Generator().manual_seed(5)
    W_ft, W_P = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    X_pub, X_b, X_P = cross_inputs()
    n = X_pub.shape[0]
    H_pub, H_priv, C = moment(X_pub, X_pub), moment(X_b, X_b), moment(X_P, X_b)
    config = OrthoConfig(forget_source="records", forget_target="public_activations", forget_lambda=2.0, damp=damp)
    fit = ForgetObjective(config).fit(W_ft, W_P, H_pub, H_priv, C=C)

    lam_abs = relative_weight(H_pub, H_priv, 2.0)
    d = damp * float(torch.diag(H_pub + lam_abs * H_priv).mean()) / 2
    X_pub, X_b, X_P, W_ft, W_P = (t.double() for t in (X_pub, X_b, X_P, W_ft, W_P))
    eye = torch.eye(16, dtype=torch.float64)
    A = torch.cat([X_pub / n ** 0.5, (lam_abs / n) ** 0.5 * X_b, d ** 0.5 * eye])  # rows: q's inputs
    Y = torch.cat([X_pub @ W_ft.t() / n ** 0.5, (lam_abs / n) ** 0.5 * X_P @ W_P.t(), d ** 0.5 * W_ft.t()])
    W_lstsq = torch.linalg.lstsq(A, Y).solution.t()
    assert torch.allclose(fit.W.double(), W_lstsq, rtol=1e-3, atol=1e-3)
    # and it is not the base-inputs target's answer: X_P differs from X_b
    old = ForgetObjective(OrthoConfig(forget_source="records", forget_lambda=2.0, damp=damp)).fit(
        W_ft.float(), W_P.float(), H_pub, H_priv)
    assert not torch.allclose(old.W.double(), W_lstsq, rtol=1e-2, atol=1e-2)


def test_each_target_takes_c_only_when_it_reads_it():
    _, _, H_pub, H_priv = split_inputs()
    W = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="'public_activations' needs C"):
        ForgetObjective(OrthoConfig(forget_source="records", forget_target="public_activations")).fit(W, W, H_pub, H_priv)
    with pytest.raises(ValueError, match="'base_inputs' takes no C"):
        ForgetObjective(OrthoConfig(forget_source="records")).fit(W, W, H_pub, H_priv, C=H_priv)
