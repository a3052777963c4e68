"""The low-rank part of the ortho stream: L = B·A, fitted to a residual under a curvature.

The residual the ortho stream restores has two parts of different shape (forget.py's names):

    R = W_ft − W_base = Δ + (W* − W_base) ,   Δ = W_ft − W* = (W_ft − W_P) Hp H'_d⁻¹ ,   Hp = lam_abs H_priv

The forget edit Δ is dense, but every row lies in H'_d⁻¹·range(H_priv): rank Δ ≤ rank H_priv. The
rounding error W* − W_base is high-rank: the sparse stream's part. So the ortho stream becomes

    Y = W_base X + alpha (S X + B (A X)) ,   L = B A ,   B [out, r] ,   A [r, in]

Every curvature is dampened as GPTQ, forget.py and `sieve.refit_values` do:
H_d = H + damp·mean(diag H)·I. The small linear algebra runs in float64; B and A come back in
float32, each rank-one term b_i a_iᵀ rescaled so that ‖b_i‖ = ‖a_i‖ (L unchanged, and fp16
storage sees both factors on one scale). A fit's first terms are its fit at a lower rank
(`LowRank.leading`), except the random control's.

(b) `weighted_svd`: the H-weighted truncated SVD (EoRA's eigenspace projection, in closed form)

    min_{rank L ≤ r} tr((E − L) Hs_d (E − L)ᵀ) = ‖(E − L) Hs_d^½‖²_F ,   Hs = H_pub + lam_s H_priv
    Hs_d = U diag(s) Uᵀ ,   G = E U diag(√s) = P Σ Qᵀ
    L = P_r Σ_r Q_rᵀ diag(1/√s) Uᵀ ,   B = P_r Σ_r ,   A = Q_rᵀ diag(1/√s) Uᵀ  (= Σ_r⁻¹ P_rᵀ E)

Eckart–Young in the whitened coordinates G = E Hs_d^½, mapped back. The objective at rank r is
Σ_{i>r} σ_i²: σ_i² is the gain of the i-th rank (`weighted_svd_spectrum`).

(a) `edit_eigenbasis`: the edit restored where the private inputs are. Derivation:

    H_priv V = H'_d V diag(μ) ,  Vᵀ H'_d V = I ,  μ_1 ≥ μ_2 ≥ … ≥ 0   (H'_d = C Cᵀ: C⁻¹ H_priv C⁻ᵀ = U diag(μ) Uᵀ, V = C⁻ᵀ U)
    H'_d⁻¹ = V Vᵀ ,  so  Δ = D Hp V Vᵀ = Σ_i μ_i c_i v_iᵀ ,  c_i = lam_abs D H'_d v_i ,  D = W_ft − W_P

The edit is a sum of components: the i-th reads the input coordinate v_iᵀx with weight μ_i, and
components with μ_i = 0 vanish (rank Δ ≤ rank H_priv). V diagonalises H_priv and the dampened
public side H'_d − Hp at once, so in every metric M = a (H'_d − Hp) + b H_priv the components
are M-orthogonal: dropping a set of them costs exactly Σ_dropped μ_i² ‖c_i‖² (Vᵀ M V)_ii, and the
M-optimal B for the rows A = V_rᵀ, Δ M V_r (V_rᵀ M V_r)⁻¹ = Δ H'_d V_r, is the same for every
such M (private inputs only, or with any public term). By the Hessians alone (order="mu", the
default), keep the r components with the largest μ: private inputs carry the most energy there
(v_iᵀ H_priv v_i = μ_i), and for c_i of equal size the cost of dropping component i, μ_i³‖c_i‖²
on the private inputs (μ_i²‖c_i‖² under H'_d), grows with μ_i. So

    L = Δ H'_d V_r V_rᵀ ,   B = Δ H'_d V_r = Δ C U_r ,   A = V_rᵀ

With r ≥ rank H_priv, L = Δ: the edit's action on the private inputs is restored exactly; with
lam = 0, Δ = 0 and L = 0. A's rows (up to their scale) depend on the Hessians only, so layers
that read one input (q/k/v, gate/up) could share them. Δ itself gives each component's cost
exactly: order="gain" keeps the r components with the largest μ_i³‖c_i‖² = μ_i ‖Δ H'_d v_i‖²,
the best subset of components on the private inputs (A is then the layer's own). The best
rank-r L on the private inputs without the basis constraint is (b) applied to Δ under H_priv
(also exact at rank H_priv, since rank Δ ≤ rank H_priv).

(c) `random_subspace`: the control. Random orthonormal rows A, and B = E Hs_d Aᵀ (A Hs_d Aᵀ)⁻¹,
the least-squares optimum under Hs_d: the best L whose rows lie in that random subspace.

Rank by bytes: L costs r·(out + in) values (2 bytes each at fp16). `allocate_ranks` hands out
rank steps across layers greedily by objective reduction per byte.

Integer codes (`code_factors`, OrthoConfig.lowrank_bits 8 or 4): A [r, in] and Bᵀ [r, out] are stored
as symmetric codes with an fp16 scale (and zero) per LOWRANK_GROUP values along in / out, as the base
is, so one rank costs about bits/16 of its fp16 bytes and a budget buys ~1.9× (8) or ~3.6× (4) the
rank. The rows of A are rounded first; B is then refitted to what the rounded rows carry, the
least-squares B of control (c) under the same Hs_d,

    Â = round(A) ,   B = E Hs_d Âᵀ (Â Hs_d Âᵀ + ε I)⁻¹ ,   B̂ = round(B) ,   L = B̂ Â

(ε = 1e-9·mean(diag) keeps rows that rounded to zero harmless), and B is rounded last.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable

import torch

from .config import OrthoConfig
from .packing import dequantize_packed, n_groups, packed_bytes
from .quantize import QuantizedWeight, QuantSpec, add_identity_, rtn

__all__ = [
    "LOWRANK_GROUP",
    "LowRank",
    "LowRankCodes",
    "code_factors",
    "factors_from_codes",
    "rank_bytes",
    "dampened",
    "weighted_error",
    "weighted_svd",
    "weighted_svd_spectrum",
    "edit_eigenbasis",
    "random_subspace",
    "rank_for_bytes",
    "step_gains",
    "allocate_ranks",
]


LOWRANK_GROUP = 64  # values per fp16 scale of coded factors, along in (A) and out (Bᵀ)


@dataclass
class LowRankCodes:
    """Integer codes of L's factors: A [r, in] and Bᵀ [r, out], each symmetric in groups of LOWRANK_GROUP
    along its second axis (unpacked uint8 codes, fp16 scales and zeros [r, n_groups])."""

    A: QuantizedWeight
    Bt: QuantizedWeight

    @property
    def bits(self) -> int:
        return self.A.spec.bits


@dataclass
class LowRank:
    """L = B @ A of one layer: B [out, r], A [r, in] (float32 while fitting). `codes`: the integer codes
    that B and A are the exact values of, when L is stored as codes (code_factors); None = floats."""

    B: torch.Tensor
    A: torch.Tensor
    codes: LowRankCodes | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def nbytes(self, dtype_bytes: int = 2) -> int:
        """Stored size: r·(out + in) values of `dtype_bytes` each (2 at fp16), or the codes' bytes."""
        out_features, in_features = self.shape
        if self.codes is not None:
            return self.rank * rank_bytes(out_features, in_features, self.codes.bits)
        return dtype_bytes * self.rank * (out_features + in_features)

    def to_dense(self) -> torch.Tensor:
        """L [out, in] float32."""
        return self.B.float() @ self.A.float()

    def leading(self, r: int) -> "LowRank":
        """The first r rank-one terms (for weighted_svd and edit_eigenbasis: their rank-r fit)."""
        return LowRank(self.B[:, :r], self.A[:r])

    @staticmethod
    def empty(out_features: int, in_features: int) -> "LowRank":
        """Rank 0: L = 0 [out, in]."""
        return LowRank(torch.zeros(out_features, 0), torch.zeros(0, in_features))


def dampened(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H_d = H + damp·mean(diag H)·I [in, in] float64 (GPTQ's convention), a new tensor: the one float64 copy
    of H, dampened in place (at in = 4096 each [in, in] float64 matrix is 128 MiB)."""
    H_d = H.double()
    H_d = H_d.clone() if H_d is H else H_d
    return add_identity_(H_d, damp * torch.diag(H_d).mean())


def weighted_error(E: torch.Tensor, L: LowRank, H: torch.Tensor) -> float:
    """tr((E − L) H (E − L)ᵀ) for E [out, in], H [in, in] (float64)."""
    F = E.double() - L.B.double() @ L.A.double()
    return float(torch.sum((F @ H.double()) * F))


def _capped(rank: int, out_features: int, in_features: int) -> int:
    if rank < 0:
        raise ValueError(f"rank={rank} must be >= 0")
    return min(rank, out_features, in_features)  # beyond min(out, in) no rank buys anything: (b) is exact there


def _balanced(B: torch.Tensor, A: torch.Tensor) -> LowRank:
    """Rescale each term b_i a_iᵀ so that ‖b_i‖ = ‖a_i‖ (L unchanged); float32."""
    nb, na = B.norm(dim=0), A.norm(dim=1)
    g = torch.where(na > 0, torch.sqrt(nb / torch.where(na > 0, na, 1.0)), torch.zeros_like(na))
    return LowRank((B / torch.where(g > 0, g, 1.0)).float(), (A * g[:, None]).float())


def _whitened(E: torch.Tensor, Hs: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G, √s, U): Hs_d = U diag(s) Uᵀ, G = E U diag(√s) [out, in] float64."""
    s, U = torch.linalg.eigh(dampened(Hs, damp))
    # With damp = 0 a singular Hs has directions the objective never sees; keep 1/√s finite there.
    s = s.clamp_min(torch.finfo(s.dtype).eps * float(s.max().clamp_min(1e-300)))
    root_s = s.sqrt()
    return (E.double() @ U) * root_s[None, :], root_s, U


def _top_eigen(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ descending, clamped at 0; eigenvectors as columns) of the symmetric M."""
    lam, V = torch.linalg.eigh((M + M.t()) / 2)
    return lam.flip(0).clamp_min(0), V.flip(1)


def _row_gram(E: torch.Tensor, Hs: torch.Tensor, damp: float) -> torch.Tensor:
    """G Gᵀ = E Hs_d Eᵀ [out, out] float64, without forming G."""
    E = E.double()
    return E @ dampened(Hs, damp) @ E.t()


def weighted_svd_spectrum(E: torch.Tensor, Hs: torch.Tensor, damp: float = OrthoConfig.damp) -> torch.Tensor:
    """σ_i² [min(out, in)] float64, descending: the objective's drop from rank i−1 to i of (b).
    The eigenvalues of the smaller Gram matrix of G: E Hs_d Eᵀ [out, out], or GᵀG [in, in]."""
    if E.shape[0] <= E.shape[1]:
        return _top_eigen(_row_gram(E, Hs, damp))[0]
    G, _, _ = _whitened(E, Hs, damp)
    return _top_eigen(G.t() @ G)[0]


def weighted_svd(E: torch.Tensor, Hs: torch.Tensor, rank: int, damp: float = OrthoConfig.damp) -> LowRank:
    """Fit (b): argmin_{rank L ≤ r} tr((E − L) Hs_d (E − L)ᵀ). E [out, in], Hs [in, in] PSD;
    r capped at min(out, in), where L = E.

    G's singular vectors come from its smaller Gram matrix, never from an SVD of G itself (an SVD of a
    [4096, 14336] matrix costs seconds on a GPU and minutes on a few cores):
      out ≤ in:  E Hs_d Eᵀ = G Gᵀ = P Σ² Pᵀ ,  B = P_r Σ_r ,  A = Σ_r⁻¹ P_rᵀ E      (L = P_r P_rᵀ E)
      out > in:  GᵀG = Q Σ² Qᵀ ,              B = G Q_r ,    A = Q_rᵀ diag(1/√s) Uᵀ
    """
    r = _capped(rank, *E.shape)
    if E.shape[0] <= E.shape[1]:
        sigma2, P = _top_eigen(_row_gram(E, Hs, damp))
        sigma = sigma2[:r].sqrt()
        B = P[:, :r] * sigma[None, :]
        # A term with σ = 0 adds nothing to L: keep its row at 0 rather than divide by 0.
        A = (P[:, :r].t() @ E.double()) / torch.where(sigma > 0, sigma, torch.inf)[:, None]
        return _balanced(B, A)
    G, root_s, U = _whitened(E, Hs, damp)
    _, Q = _top_eigen(G.t() @ G)
    B = G @ Q[:, :r]  # P_r Σ_r
    A = (Q[:, :r].t() / root_s[None, :]) @ U.t()  # Q_rᵀ diag(1/√s) Uᵀ
    return _balanced(B, A)


def _generalized_eigenbasis(H_priv: torch.Tensor, H_prime: torch.Tensor, damp: float):
    """(μ descending, U, C): H'_d = C Cᵀ, C⁻¹ H_priv C⁻ᵀ = U diag(μ) Uᵀ (float64)."""
    C, info = torch.linalg.cholesky_ex(dampened(H_prime, damp))
    if info != 0:
        raise ValueError("H' is not positive definite; give damp > 0")
    Ci_H = torch.linalg.solve_triangular(C, H_priv.double(), upper=False)  # C⁻¹ H_priv
    H_hat = torch.linalg.solve_triangular(C, Ci_H.t(), upper=False)  # C⁻¹ H_priv C⁻ᵀ (H_priv symmetric)
    mu, U = torch.linalg.eigh((H_hat + H_hat.t()) / 2)
    return mu.flip(0), U.flip(1), C


def edit_eigenbasis(
    delta: torch.Tensor,
    H_priv: torch.Tensor,
    H_prime: torch.Tensor,
    rank: int,
    damp: float = OrthoConfig.damp,
    order: str = "mu",
) -> LowRank:
    """Fit (a): L = Δ H'_d V_r V_rᵀ, r components of the edit in the generalized eigenbasis of
    (H_priv, H'_d): those of the largest μ (order="mu"), or of the largest μ_i ‖Δ H'_d v_i‖² ("gain").

    delta: Δ = W_ft − W* [out, in]; H_priv [in, in]: the private curvature (any positive multiple:
    V does not depend on its scale; for forget_source "free", the pull term); H_prime: H' [in, in]
    undampened, as `FitTarget.H` (dampened here with the damp forget.py solved W* with, so that
    r ≥ rank H_priv gives L = Δ).
    """
    if order not in ("mu", "gain"):
        raise ValueError(f"order={order!r} is not known; choose 'mu' or 'gain'")
    # Capped at the number of components, in, not at min(out, in): with out < rank H_priv, Δ needs
    # all its components in this basis (a rank-out form of the same L is (b) of Δ).
    r = _capped(rank, delta.shape[1], delta.shape[1])
    mu, U, C = _generalized_eigenbasis(H_priv, H_prime, damp)
    B_all = delta.double() @ (C @ U)  # Δ H'_d V = Δ C U: column i is μ_i c_i
    if order == "mu":
        keep = torch.arange(r, device=U.device)
    else:
        keep = torch.argsort(mu.clamp_min(0) * B_all.square().sum(0), descending=True, stable=True)[:r]
    B = B_all[:, keep]  # Δ H'_d V_r
    A = torch.linalg.solve_triangular(C.t(), U[:, keep], upper=True).t()  # V_rᵀ = (C⁻ᵀ U_r)ᵀ
    return _balanced(B, A)


def random_subspace(
    E: torch.Tensor,
    Hs: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    damp: float = OrthoConfig.damp,
) -> LowRank:
    """Control (c): A random orthonormal [r, in], B = E Hs_d Aᵀ (A Hs_d Aᵀ)⁻¹ [out, r]: the best L
    with rows in a random r-dimensional subspace."""
    r = _capped(rank, *E.shape)
    Q, _ = torch.linalg.qr(torch.randn(E.shape[1], r, generator=generator, dtype=torch.float64))
    A = Q.t().to(E.device)
    Hs_d = dampened(Hs, damp)
    HA = Hs_d @ A.t()  # Hs_d Aᵀ [in, r]
    B = torch.linalg.solve(A @ HA, (E.double() @ HA).t()).t()  # (A Hs_d Aᵀ) symmetric
    return _balanced(B, A)


def rank_bytes(out_features: int, in_features: int, bits: int = 16) -> int:
    """Stored bytes of one rank of L (a column of B and a row of A): 2 a value at bits 16, else the packed
    codes plus an fp16 scale and zero per LOWRANK_GROUP values of each factor (code_factors)."""
    if bits == 16:
        return 2 * (out_features + in_features)
    return sum(packed_bytes(n, bits) + 4 * n_groups(n, LOWRANK_GROUP) for n in (out_features, in_features))


def rank_for_bytes(out_features: int, in_features: int, nbytes: int, bits: int = 16) -> int:
    """The largest r with r·rank_bytes(out, in, bits) ≤ nbytes, capped at min(out, in)."""
    return min(max(0, nbytes) // rank_bytes(out_features, in_features, bits), out_features, in_features)


def factors_from_codes(get, bits: int, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, r], A [r, in]) in `dtype` from stored codes: get(key) -> the tensor ortho_Aq, ortho_Aq_scales,
    ortho_Aq_zeros, ortho_Btq, ... (packed uint8 codes, fp16 scales and zeros, as layer.OrthoLinear holds them)."""
    A, Bt = (dequantize_packed(get(f), get(f"{f}_scales"), get(f"{f}_zeros"), bits, LOWRANK_GROUP, n, dtype)
             for f, n in (("ortho_Aq", in_features), ("ortho_Btq", out_features)))
    return Bt.t(), A


def code_factors(L: LowRank, E: torch.Tensor, Hs: torch.Tensor, bits: int, damp: float = OrthoConfig.damp) -> LowRank:
    """L stored as `bits`-bit codes (module docstring): A rounded, B refitted to the rounded A under Hs_d
    and rounded. E [out, in] the residual L was fitted to, Hs [in, in] its curvature. Returns the coded
    L (B, A float32, the codes' exact values)."""
    if L.rank == 0:
        return L
    spec = QuantSpec(bits, LOWRANK_GROUP, True)
    A_q = rtn(L.A.float().cpu(), spec)
    A = A_q.dequantize().double().to(E.device)
    HA = dampened(Hs, damp) @ A.t()  # Hs_d Âᵀ [in, r]
    M = A @ HA
    add_identity_(M, 1e-9 * torch.diag(M).mean().clamp_min(1e-30))
    B = torch.linalg.solve(M, (E.double() @ HA).t()).t()
    Bt_q = rtn(B.t().float().cpu(), spec)
    dev = L.B.device
    return LowRank(Bt_q.dequantize().t().contiguous().to(dev), A.float().to(dev), LowRankCodes(A_q, Bt_q))


def step_gains(spectrum: torch.Tensor, step: int) -> list[float]:
    """gains[k] = Σ σ_i² over ranks k·step < i ≤ (k+1)·step: the objective's drop of step k (the
    last step may be partial)."""
    return [float(chunk.sum()) for chunk in spectrum.double().split(step)]


def allocate_ranks(
    gains: dict[Hashable, list[float]],
    costs: dict[Hashable, int],
    budget_bytes: int,
    step: int = 16,
) -> dict[Hashable, int]:
    """Greedy global ranks: repeatedly give one step of `step` ranks to the layer whose next step
    reduces the objective most per byte, while it fits in the budget.

    gains[key][k]: the objective's drop from rank k·step to (k+1)·step (`step_gains`);
    costs[key]: bytes of one rank of that layer (dtype_bytes·(out + in)), so a step costs step·costs[key].
    Returns the rank per key (a multiple of `step`; a fit caps it at min(out, in)), with
    Σ rank·costs ≤ budget_bytes. Optimal among step allocations when each layer's gains do not
    increase (the weighted SVD's do not) and the steps' costs are equal; greedy otherwise.
    Ties go to the key listed first.
    """
    order = {key: i for i, key in enumerate(gains)}
    steps = {key: 0 for key in gains}
    heap: list[tuple[float, int, Hashable]] = []

    def push(key: Hashable) -> None:
        k = steps[key]
        if k < len(gains[key]) and gains[key][k] > 0:
            heapq.heappush(heap, (-gains[key][k] / (step * costs[key]), order[key], key))

    for key in gains:
        push(key)
    left = budget_bytes
    while heap:
        _, _, key = heapq.heappop(heap)
        if step * costs[key] > left:
            continue  # its later steps cost as much: this layer is done
        left -= step * costs[key]
        steps[key] += 1
        push(key)
    return {key: k * step for key, k in steps.items()}
