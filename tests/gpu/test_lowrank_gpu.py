"""On CUDA, a layer with both ortho parts (the fused kernel for base + S, two thin GEMMs for L)
agrees with the CPU path in float64, for scalar and per-row alpha and several batch sizes, with L
stored as fp16 factors or as 4-bit codes (lowrank_bits 4), read through fp16 factors made once per device or
by kernels.lowrank_codes."""
import pytest
import torch

from libortho.csr import csr_from_flat_indices
from libortho.layer import OrthoLinear
from libortho.lowrank import LowRank, code_factors
from libortho.quantize import QuantSpec, rtn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layer(seed: int = 0, coded: bool = False) -> OrthoLinear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(512, 1024, generator=g) * 0.05
    base = rtn(W, QuantSpec(4, 128, True))
    R = W - base.dequantize()
    idx = torch.topk(R.abs().reshape(-1), int(0.01 * W.numel())).indices
    B = (torch.randn(512, 16, generator=g) * 0.02).half()
    A = (torch.randn(16, 1024, generator=g) * 0.02).half()
    lowrank = (B, A)
    if coded:
        H = torch.eye(1024)
        lowrank = code_factors(LowRank(B.float(), A.float()), B.float() @ A.float(), H, 4)
    return OrthoLinear.from_parts(base, csr_from_flat_indices(idx, R, torch.float16), None, lowrank=lowrank)


@pytest.mark.parametrize("coded", [False, "fp16 factors", "codes kernel"])
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_both_ortho_parts_on_cuda_match_the_cpu_path(m, coded, monkeypatch):
    from libortho.kernels import lowrank_codes
    monkeypatch.setattr(lowrank_codes, "ENABLED", coded == "codes kernel")
    cpu, gpu = _layer(coded=bool(coded)), _layer(coded=bool(coded)).cuda()
    assert gpu.lowrank_bits == (4 if coded else 16)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m))
    for alpha in (0.0, 1.0, torch.rand(m, generator=torch.Generator().manual_seed(1))):
        ref = cpu.reference_forward(x.double(), alpha.double() if isinstance(alpha, torch.Tensor) else alpha)
        gpu.alpha_state.default = alpha.cuda() if isinstance(alpha, torch.Tensor) else alpha
        y = gpu(x.half().cuda()).double().cpu()
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2, (m, alpha)
