import threading

import pytest
import torch

import libortho
from libortho.layer import OrthoLinear, ortho_layers
from libortho.state import OrthoState, attach
from libortho.switch import AlphaState
from libortho.quantize import QuantSpec, rtn
from libortho.csr import OrthoCSR, csr_from_flat_indices


def make_layer(ratio: float, bias: bool = True, seed: int = 0) -> tuple[OrthoLinear, torch.Tensor]:
    torch.manual_seed(seed)
    W = torch.randn(48, 200)
    base = rtn(W, QuantSpec(4, 64, True))
    R = W - base.dequantize()
    k = int(ratio * W.numel())
    idx = torch.topk(R.abs().reshape(-1), k).indices
    b = torch.randn(48) if bias else None
    return OrthoLinear.from_parts(base, csr_from_flat_indices(idx, R, torch.float16), b), W


def test_full_budget_at_alpha_one_reproduces_W():
    layer, W = make_layer(1.0)
    W_hat = layer.base_weight() + layer.ortho_weight()
    assert torch.allclose(W_hat, W, atol=2e-3, rtol=1e-3)  # fp16 residuals: rounding only
    x = torch.randn(3, 5, 200)
    y = layer.reference_forward(x, 1.0)
    assert torch.allclose(y, x @ W.t() + layer.bias, atol=2e-2, rtol=1e-3)


def test_alpha_zero_is_the_dense_base_matmul_and_skips_ortho():
    layer, _ = make_layer(0.05)
    x = torch.randn(7, 200)
    expected = x @ layer.base_weight().t() + layer.bias
    layer.ortho_val.fill_(float("nan"))  # alpha = 0 must never read the ortho stream
    layer._dense_cache = {}
    assert torch.equal(layer.reference_forward(x, 0.0), expected)


def test_per_row_alpha_matches_scalar_rows():
    layer, _ = make_layer(0.05)
    x = torch.randn(4, 3, 200)
    a = torch.tensor([0.0, 0.25, 1.0, 0.5])
    y = layer.reference_forward(x, a)
    for i, ai in enumerate(a.tolist()):
        assert torch.allclose(y[i], layer.reference_forward(x[i], ai), atol=1e-5)


def test_scalar_alpha_multiplies_by_one_merged_weight_kept_for_the_latest_alpha():
    layer, _ = make_layer(0.05)
    x = torch.randn(6, 200)
    for a in (0.5, 1.0, 0.25):
        two_streams = x @ layer.base_weight().t() + a * (x @ layer.ortho_weight().t()) + layer.bias
        assert torch.allclose(layer.reference_forward(x, a), two_streams, atol=1e-5, rtol=1e-5)
        assert [k[:2] for k in layer._dense_cache if k[0] == "merged"] == [("merged", a)]


def test_buffers_follow_to_and_state_dict():
    layer, _ = make_layer(0.05)
    keys = set(layer.state_dict())
    assert {"qweight", "scales", "zeros", "ortho_crow", "ortho_col", "ortho_val", "bias"} <= keys
    x = torch.randn(2, 200)
    y32 = layer.reference_forward(x, 1.0)
    layer_copy, _ = make_layer(0.05, seed=1)
    layer_copy.load_state_dict(layer.state_dict())
    assert torch.equal(layer_copy.reference_forward(x, 1.0), y32)
    y64 = layer.to(torch.float64).reference_forward(x.double(), 1.0)  # buffers keep dtype; cache rebuilt
    assert layer.qweight.dtype == torch.uint8
    assert torch.allclose(y64.float(), y32, atol=1e-4)


def test_bad_alpha_is_refused_with_a_clear_message():
    state = AlphaState()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        state.check(1.5)
    with pytest.raises(ValueError, match="number"):
        state.check("high")
    no_ortho = AlphaState(ortho_available=False)
    with pytest.raises(ValueError, match="ortho"):
        no_ortho.check(0.5)
    assert no_ortho.check(0.0) == 0.0


def test_threads_with_different_alphas_get_their_own_outputs():
    layer, _ = make_layer(0.2)
    model = torch.nn.Sequential(layer)
    attach(model, OrthoState(AlphaState(default=1.0)), ortho_layers(model))
    x = torch.randn(16, 200)
    alone = {}
    for a in (0.0, 0.5, 1.0):
        with libortho.alpha(model, a):
            alone[a] = model(x)
    results: dict[float, list[torch.Tensor]] = {a: [] for a in alone}
    barrier = threading.Barrier(3)

    def worker(a: float) -> None:
        with libortho.alpha(model, a):
            barrier.wait()
            for _ in range(50):
                results[a].append(model(x))

    threads = [threading.Thread(target=worker, args=(a,)) for a in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, outs in results.items():
        assert all(torch.equal(o, alone[a]) for o in outs)
    assert libortho.get_alpha(model) == 1.0  # scopes never leak into the default


def test_set_alpha_on_a_plain_model_explains():
    with pytest.raises(ValueError, match="no libortho layers"):
        libortho.set_alpha(torch.nn.Linear(2, 2), 0.0)


def lowrank_layer(ratio: float = 0.02, rank: int = 6, seed: int = 1) -> OrthoLinear:
    layer, W = make_layer(ratio, seed=seed)
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(layer.out_features, rank, generator=g) * 0.05
    A = torch.randn(rank, layer.in_features, generator=g) * 0.05
    base = rtn(W, QuantSpec(4, 64, True))
    csr = OrthoCSR(layer.ortho_crow, layer.ortho_col, layer.ortho_val, (layer.out_features, layer.in_features))
    return OrthoLinear.from_parts(base, csr, layer.bias, lowrank=(B.half(), A.half()))


def test_the_low_rank_part_joins_the_ortho_stream_and_scales_with_alpha():
    """Y = X W_baseᵀ + alpha (S X + B (A X)) + b, per scalar and per row, against a float64 transcription."""
    layer = lowrank_layer()
    assert layer.ortho_rank == 6 and layer.has_ortho
    x = torch.randn(4, 3, 200, dtype=torch.float64)
    Wb, S = layer.base_weight().double(), OrthoCSR(layer.ortho_crow, layer.ortho_col, layer.ortho_val, (48, 200)).to_dense().double()
    L = layer.ortho_B.double() @ layer.ortho_A.double()
    for a in (0.0, 0.5, 1.0):
        expected = x @ Wb.t() + a * (x @ S.t() + (x @ layer.ortho_A.double().t()) @ layer.ortho_B.double().t()) + layer.bias.double()
        # a scalar alpha multiplies by the merged W_base + alpha W_ortho, formed in float32
        assert torch.allclose(layer.reference_forward(x, a), expected, rtol=1e-6, atol=1e-5), a
        assert torch.allclose(x @ (Wb + a * (S + L)).t() + layer.bias.double(), expected, atol=1e-9)
    rows = torch.tensor([0.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    per_row = layer.reference_forward(x, rows)
    for i, a in enumerate(rows.tolist()):
        assert torch.allclose(per_row[i], layer.reference_forward(x[i : i + 1], a)[0], rtol=1e-6, atol=1e-5)


def test_the_gpu_path_adds_the_low_rank_part_beside_the_kernel():
    """What a CUDA forward computes (the fused kernel for base + S, then two thin GEMMs for L), run
    on the CPU through the kernels' PyTorch fallback, equals the CPU path, scalar and per-row alpha."""
    from libortho.kernels.dispatch import torch_dual_stream

    layer = lowrank_layer()
    x = torch.randn(5, 200)
    for alpha in (0.0, 0.7, torch.tensor([0.0, 1.0, 0.5, 0.2, 1.0])):
        rows = layer._alpha_per_row(alpha, x)
        low = layer._lowrank_term(x, alpha)
        gpu_like = torch_dual_stream(x, layer, rows) + (0 if low is None else low)
        assert torch.allclose(gpu_like, layer.reference_forward(x, alpha), atol=1e-4), alpha
