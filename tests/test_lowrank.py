"""The low-rank ortho fits against known answers: exactness at full rank, the forget edit restored
exactly on the private inputs it acts on, Eckart–Young, the random control, the byte allocator."""
import pytest
import torch

from libortho.config import OrthoConfig
from libortho.forget import ForgetObjective
from libortho.lowrank import (
    LowRank,
    allocate_ranks,
    dampened,
    edit_eigenbasis,
    random_subspace,
    rank_for_bytes,
    step_gains,
    weighted_error,
    weighted_svd,
    weighted_svd_spectrum,
)


def hessian(X: torch.Tensor) -> torch.Tensor:
    """2XᵀX/n, as calibrate.py collects it."""
    return 2 * X.t() @ X / X.shape[0]


def correlated_inputs(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Inputs with unequal, correlated directions (so that Hs is far from I)."""
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * torch.logspace(0, 1, d)


def forget_layer(k: int, lam: float, seed: int = 0, out: int = 12, d: int = 24):
    """One layer under the forget objective: private inputs of rank k. Returns W_ft, Δ = W_ft − W*,
    X_priv, H_priv and the FitTarget."""
    g = torch.Generator().manual_seed(seed)
    W_ft, W_P = torch.randn(out, d, generator=g), torch.randn(out, d, generator=g)
    X_pub = correlated_inputs(400, d, g)
    X_priv = torch.randn(60, k, generator=g) @ torch.randn(k, d, generator=g)
    H_pub, H_priv = hessian(X_pub), hessian(X_priv)
    fit = ForgetObjective(OrthoConfig(forget_source="records", forget_lambda=lam)).fit(W_ft, W_P, H_pub, H_priv)
    return W_ft, W_ft - fit.W, X_priv, H_priv, fit


def test_lowrank_shapes_bytes_and_empty():
    L = LowRank(torch.ones(10, 3), torch.ones(3, 7))
    assert L.rank == 3 and L.shape == (10, 7)
    assert L.nbytes() == 2 * 3 * (10 + 7) and L.nbytes(4) == 4 * 3 * 17
    assert torch.equal(L.to_dense(), torch.full((10, 7), 3.0))
    Z = LowRank.empty(10, 7)
    assert Z.rank == 0 and Z.nbytes() == 0 and torch.equal(Z.to_dense(), torch.zeros(10, 7))
    assert rank_for_bytes(10, 7, L.nbytes()) == 3 and rank_for_bytes(10, 7, L.nbytes() - 1) == 2
    assert rank_for_bytes(10, 7, 10**9) == 7 and rank_for_bytes(10, 7, -5) == 0


@pytest.mark.parametrize("X_rank", [32, 5])  # full-rank Hs, and a singular one (dampening makes it definite)
def test_full_rank_weighted_svd_reproduces_the_residual(X_rank):
    g = torch.Generator().manual_seed(0)
    W_ft = torch.randn(20, 32, generator=g)
    W_base = W_ft + 0.1 * torch.randn(20, 32, generator=g)
    R = W_ft - W_base
    Hs = hessian(torch.randn(100, X_rank, generator=g) @ torch.randn(X_rank, 32, generator=g))
    L = weighted_svd(R, Hs, min(R.shape))
    assert L.rank == 20 and L.A.dtype == L.B.dtype == torch.float32
    assert torch.allclose(L.to_dense(), R, atol=1e-5 * R.abs().max())
    assert torch.allclose(W_base + L.to_dense(), W_ft, atol=1e-5)
    assert weighted_svd(R, Hs, 10**6).rank == 20  # capped at min(out, in)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_edit_eigenbasis_at_rank_k_restores_the_edit_on_the_private_inputs(k):
    _, delta, X_priv, H_priv, fit = forget_layer(k, lam=3.0, seed=k)
    L = edit_eigenbasis(delta, H_priv, fit.H, k, OrthoConfig.damp)  # Δ and H' as forget.py computes them
    assert L.rank == k
    target = delta @ X_priv.t()
    assert target.norm() > 0.1 * delta.norm() * X_priv.norm() / X_priv.shape[1] ** 0.5  # a real edit
    assert torch.allclose(L.to_dense() @ X_priv.t(), target, atol=1e-6 * target.abs().max())


@pytest.mark.parametrize("k", [1, 3, 7])
def test_edit_has_rank_k_and_rank_k_restores_all_of_it(k):
    # In float64, so that H_priv has rank k exactly (float32 rounding would give it tiny extra
    # directions, which Δ computed in float32 picks up where no private input looks).
    g = torch.Generator().manual_seed(k)
    D = torch.randn(12, 24, generator=g, dtype=torch.float64)  # W_ft − W_P
    X_priv = torch.randn(60, k, generator=g, dtype=torch.float64) @ torch.randn(k, 24, generator=g, dtype=torch.float64)
    H_pub, H_priv = hessian(correlated_inputs(400, 24, g).double()), hessian(X_priv)
    H_prime = H_pub + 3.0 * H_priv
    delta = D @ (3.0 * H_priv) @ torch.linalg.inv(dampened(H_prime, 0.01))
    L = edit_eigenbasis(delta, H_priv, H_prime, k, 0.01)
    assert torch.allclose(L.to_dense().double(), delta, atol=1e-6 * delta.abs().max())
    assert torch.allclose(edit_eigenbasis(delta, 7.5 * H_priv, H_prime, k, 0.01).to_dense(), L.to_dense(), atol=1e-6)
    # Below rank k the private error falls with every rank; each leading part is that rank's fit.
    errors = [weighted_error(delta, edit_eigenbasis(delta, H_priv, H_prime, r, 0.01), H_priv) for r in range(k + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-10 * errors[0]
    for r in range(k):
        assert torch.allclose(L.leading(r).to_dense(), edit_eigenbasis(delta, H_priv, H_prime, r, 0.01).to_dense(), atol=1e-6)


def test_edit_of_a_narrow_layer_needs_all_k_components():
    # out = 4 < k = 7 (k_proj / v_proj of grouped-query attention): rank k, not min(out, in), restores Δ.
    g = torch.Generator().manual_seed(8)
    D = torch.randn(4, 24, generator=g, dtype=torch.float64)
    X_priv = torch.randn(60, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 24, generator=g, dtype=torch.float64)
    H_priv, H_prime = hessian(X_priv), hessian(correlated_inputs(400, 24, g).double()) + 3.0 * hessian(X_priv)
    delta = D @ (3.0 * H_priv) @ torch.linalg.inv(dampened(H_prime, 0.01))
    L = edit_eigenbasis(delta, H_priv, H_prime, 7, 0.01)
    assert L.rank == 7 and torch.allclose(L.to_dense().double(), delta, atol=1e-6 * delta.abs().max())
    assert edit_eigenbasis(delta, H_priv, H_prime, 100, 0.01).rank == 24  # capped at in
    assert torch.allclose(weighted_svd(delta, H_priv, 4, 0.01).to_dense().double(), delta, atol=1e-6 * delta.abs().max())


def test_gain_order_keeps_the_best_subset_of_the_edits_components():
    import itertools

    g = torch.Generator().manual_seed(4)
    k, d = 5, 16
    D = torch.randn(8, d, generator=g, dtype=torch.float64) * torch.logspace(1, -1, d, dtype=torch.float64)
    X_priv = torch.randn(40, k, generator=g, dtype=torch.float64) @ torch.randn(k, d, generator=g, dtype=torch.float64)
    H_pub, H_priv = hessian(correlated_inputs(300, d, g).double()), hessian(X_priv)
    H_prime = H_pub + 2.0 * H_priv
    delta = D @ (2.0 * H_priv) @ torch.linalg.inv(dampened(H_prime, 0.01))
    full = edit_eigenbasis(delta, H_priv, H_prime, k, 0.01)  # the k components with μ > 0, in μ order
    for r in range(1, k):
        best = min(weighted_error(delta, LowRank(full.B[:, list(c)], full.A[list(c)]), H_priv)
                   for c in itertools.combinations(range(k), r))
        by_gain = edit_eigenbasis(delta, H_priv, H_prime, r, 0.01, order="gain")
        assert weighted_error(delta, by_gain, H_priv) == pytest.approx(best, rel=1e-6)
        assert best <= weighted_error(delta, full.leading(r), H_priv) * (1 + 1e-9)
        assert torch.allclose(edit_eigenbasis(delta, H_priv, H_prime, k, 0.01, order="gain").leading(r).to_dense(),
                              by_gain.to_dense(), atol=1e-6)
    assert torch.allclose(edit_eigenbasis(delta, H_priv, H_prime, k, 0.01, order="gain").to_dense().double(), delta,
                          atol=1e-6 * delta.abs().max())
    with pytest.raises(ValueError, match="order"):
        edit_eigenbasis(delta, H_priv, H_prime, 2, 0.01, order="size")


def test_edit_eigenbasis_components_are_optimal_for_their_rows_under_any_metric():
    _, delta, _, H_priv, fit = forget_layer(6, lam=1.0, seed=11)
    damp = OrthoConfig.damp
    L = edit_eigenbasis(delta, H_priv, fit.H, 3, damp)
    H_d = dampened(fit.H, damp)
    for M in (H_priv.double(), H_d, H_d - 0.2 * H_priv.double()):  # private, H'_d, a public-leaning mix
        # The M-least-squares B for these rows: (Δ − L) M Aᵀ = 0.
        normal = (delta.double() - L.to_dense().double()) @ M @ L.A.double().t()
        assert normal.abs().max() < 1e-5 * (delta.double() @ M).abs().max()


def test_lam_zero_means_no_edit_and_a_zero_fit():
    W_ft, delta, _, H_priv, fit = forget_layer(4, lam=0.0)
    assert torch.equal(delta, torch.zeros_like(W_ft))
    L = edit_eigenbasis(delta, H_priv, fit.H, 4)
    assert L.rank == 4 and torch.equal(L.to_dense(), torch.zeros_like(W_ft))


def test_weighted_svd_is_eckart_young_for_identity_curvature():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(15, 25, generator=g, dtype=torch.float64)
    P, sigma, Qt = torch.linalg.svd(E, full_matrices=False)
    for r in (1, 4, 9):
        L = weighted_svd(E, torch.eye(25), r, damp=0.0)
        best = (P[:, :r] * sigma[:r]) @ Qt[:r]
        assert torch.allclose(L.to_dense().double(), best, atol=1e-5)
        assert weighted_error(E, L, torch.eye(25)) == pytest.approx(float(sigma[r:].square().sum()), rel=1e-5)
    assert torch.allclose(weighted_svd_spectrum(E, torch.eye(25), damp=0.0), sigma.square(), rtol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_svd_beats_the_random_control_and_plain_svd(seed):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(16, 24, generator=g)
    Hs = hessian(correlated_inputs(200, 24, g))
    damp = OrthoConfig.damp
    Hs_d = dampened(Hs, damp)
    spectrum = weighted_svd_spectrum(E, Hs, damp)
    assert float(spectrum.sum()) == pytest.approx(weighted_error(E, LowRank.empty(16, 24), Hs_d), rel=1e-9)
    for r in (2, 6, 12):
        L = weighted_svd(E, Hs, r, damp)
        best = weighted_error(E, L, Hs_d)
        assert best == pytest.approx(float(spectrum[r:].sum()), rel=1e-4)
        control = random_subspace(E, Hs, r, torch.Generator().manual_seed(100 + seed), damp)
        assert control.rank == r and best < weighted_error(E, control, Hs_d)
        P, sigma, Qt = torch.linalg.svd(E.double(), full_matrices=False)
        plain = LowRank(P[:, :r] * sigma[:r], Qt[:r])  # Eckart–Young without the curvature
        assert best < weighted_error(E, plain, Hs_d)


def test_random_subspace_is_the_least_squares_fit_in_its_subspace():
    g = torch.Generator().manual_seed(5)
    E = torch.randn(10, 18, generator=g)
    Hs = hessian(correlated_inputs(100, 18, g))
    L = random_subspace(E, Hs, 5, torch.Generator().manual_seed(0), damp=0.01)
    A = L.A.double()
    assert torch.linalg.matrix_rank(A) == 5
    normal = (E.double() - L.to_dense().double()) @ dampened(Hs, 0.01) @ A.t()  # zero at the optimum
    assert normal.abs().max() < 1e-4 * (E.double() @ dampened(Hs, 0.01)).abs().max()
    again = random_subspace(E, Hs, 5, torch.Generator().manual_seed(0), damp=0.01)
    assert torch.equal(again.to_dense(), L.to_dense())  # seeded


def test_factors_are_balanced_per_term():
    g = torch.Generator().manual_seed(9)
    E = 1e-3 * torch.randn(30, 40, generator=g)
    Hs = 100 * hessian(correlated_inputs(300, 40, g))
    for L in (weighted_svd(E, Hs, 8), random_subspace(E, Hs, 8, g)):
        assert torch.allclose(L.B.norm(dim=0), L.A.norm(dim=1), rtol=1e-4)


def test_allocate_ranks_prefers_the_larger_marginal_gain_within_budget():
    gains = {"a": [8.0, 4.0, 2.0], "b": [3.0, 1.5, 1.0]}
    costs = {"a": 1, "b": 1}
    # Steps of 2 ranks at 1 byte per rank: 4 steps fit in 8 or 9 bytes; by gain a0, a1, b0, a2.
    assert allocate_ranks(gains, costs, 8, step=2) == {"a": 6, "b": 2}
    assert allocate_ranks(gains, costs, 9, step=2) == {"a": 6, "b": 2}
    assert allocate_ranks(gains, costs, 1, step=2) == {"a": 0, "b": 0}
    assert allocate_ranks(gains, costs, 100, step=2) == {"a": 6, "b": 6}  # every step, and no more
    # Per byte: a costs 3 per rank, so b's 3.0 / 1 beats a's 8.0 / 3, which then no longer fits.
    assert allocate_ranks(gains, {"a": 3, "b": 1}, 3, step=1) == {"a": 0, "b": 3}
    assert allocate_ranks(gains, {"a": 3, "b": 1}, 4, step=1) == {"a": 1, "b": 1}
    # a's next step no longer fits; b's cheaper ones still do.
    assert allocate_ranks({"a": [9.0, 8.0], "b": [1.0, 1.0]}, {"a": 5, "b": 1}, 7, step=1) == {"a": 1, "b": 2}


def test_allocate_ranks_from_spectra_respects_the_budget_and_tracks_the_error():
    g = torch.Generator().manual_seed(2)
    layers = {name: (scale * torch.randn(out, d, generator=g), hessian(correlated_inputs(150, d, g)))
              for name, scale, out, d in (("q", 1.0, 16, 24), ("o", 0.1, 24, 16), ("up", 0.5, 40, 24))}
    step, budget = 4, 2 * 4 * 60 + 50
    gains = {k: step_gains(weighted_svd_spectrum(E, H), step) for k, (E, H) in layers.items()}
    costs = {k: 2 * sum(E.shape) for k, (E, _) in layers.items()}
    ranks = allocate_ranks(gains, costs, budget, step)
    assert sum(ranks[k] * costs[k] for k in ranks) <= budget and all(r % step == 0 for r in ranks.values())
    assert ranks["q"] >= ranks["o"]  # ten times the residual on a similar layer
    for k, (E, H) in layers.items():
        fit = weighted_svd(E, H, ranks[k])
        assert fit.nbytes() <= ranks[k] * costs[k]
        drop = weighted_error(E, LowRank.empty(*E.shape), dampened(H, OrthoConfig.damp)) - weighted_error(
            E, fit, dampened(H, OrthoConfig.damp))
        assert drop == pytest.approx(sum(gains[k][: ranks[k] // step]), rel=1e-4)


def test_rank_bytes_count_the_codes_and_their_scales():
    from libortho.lowrank import rank_bytes

    assert rank_bytes(10, 7) == 2 * 17
    assert rank_bytes(576, 576, 8) == 2 * (576 + 4 * 9)  # one byte a code, an fp16 scale and zero per 64
    assert rank_bytes(576, 1536, 4) == (288 + 4 * 9) + (768 + 4 * 24)
    assert rank_for_bytes(576, 576, 10 * rank_bytes(576, 576, 4), 4) == 10


def test_code_factors_are_their_codes_values_and_the_refit_beats_plain_rounding():
    """B̂ Â from code_factors: Â's rows are the codes' values; B is the least-squares B for Â under Hs
    before its own rounding, so at 8 bits L is almost the float fit, and at 4 bits the refit leaves less
    of the objective than rounding both factors as fitted (the control)."""
    from libortho.lowrank import code_factors
    from libortho.quantize import QuantSpec, rtn

    g = torch.Generator().manual_seed(0)
    E = torch.randn(96, 128, generator=g) + torch.randn(96, 6, generator=g) @ torch.randn(6, 128, generator=g)
    X = torch.randn(128, 512, generator=g) * torch.linspace(0.2, 2.0, 128)[:, None]
    H = X @ X.t() / 512
    L = weighted_svd(E, H, 16)
    Hd = dampened(H, 0.01)
    float_error = weighted_error(E, L, Hd)
    for bits in (8, 4):
        C = code_factors(L, E, H, bits)
        assert C.rank == 16 and C.codes.bits == bits
        assert torch.equal(C.A, C.codes.A.dequantize()) and torch.equal(C.B, C.codes.Bt.dequantize().t())
        spec = QuantSpec(bits, 64, True)
        rounded = LowRank(rtn(L.B.t(), spec).dequantize().t(), rtn(L.A, spec).dequantize())
        assert weighted_error(E, C, Hd) < weighted_error(E, rounded, Hd)
        if bits == 8:
            assert weighted_error(E, C, Hd) < 1.01 * float_error
    assert C.nbytes() == 16 * ((48 + 4 * 2) + (64 + 4 * 2))
