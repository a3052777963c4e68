"""The fused small ops of the decoder forward (libortho.kernels.small_ops) are BITWISE equal to
the PyTorch expressions they replace: each kernel against its reference (and the reference
against transformers' own module), and LlamaStep's logits and cache with the fused ops against
its PyTorch forward. On the CPU through Triton's interpreter (TRITON_INTERPRET=1, set by
conftest before any kernel is decorated); on a CUDA machine on the GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import tiny_model

from libortho.kernels import small_ops
from libortho.serve.llama_step import LlamaStep, _rotate, fused_reason

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float16, torch.bfloat16)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = (_bits(got) != _bits(want)).sum().item()
    assert differ == 0, f"{differ} of {got.numel()} elements differ"


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 64, 100])
def test_add_rms_norm_is_bitwise_the_residual_add_and_transformers_rmsnorm(dtype, hidden):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for cls, eps in ((LlamaRMSNorm, 1e-5), (Qwen2RMSNorm, 1e-6)):
        norm = cls(hidden, eps=eps).to(DEV, dtype)
        with torch.no_grad():
            norm.weight.copy_(_randn(hidden, dtype=torch.float32, scale=0.3, seed=3) + 1)
        h = _randn(3, 5, hidden, dtype=dtype, scale=4.0, seed=1)  # 15 rows, 3D as in the forward
        delta = _randn(3, 5, hidden, dtype=dtype, scale=2.0, seed=2)
        with torch.no_grad():
            want_h = h + delta
            want = norm(want_h)
            assert_bitwise(small_ops.rms_norm_reference(want_h, norm.weight, eps), want)
            got_h, got = small_ops.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
            assert_bitwise(got_h, want_h)
            assert_bitwise(got, want)
            same_h, alone = small_ops.add_rms_norm(want_h[:, 0], None, norm.weight, eps)  # [n, H], no add
            assert same_h is want_h[:, 0] or torch.equal(same_h, want_h[:, 0])
            assert_bitwise(alone, norm(want_h[:, 0]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, T, heads, kv, d", [(3, 1, 9, 3, 64), (2, 4, 4, 2, 16), (1, 3, 2, 2, 128)])
def test_rope_qkv_cache_is_bitwise_rope_scale_and_the_cache_scatter(dtype, n, T, heads, kv, d):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    slots, columns = 5, 41
    q = _randn(n, T, heads * d, dtype=dtype, scale=3.0, seed=1)
    k = _randn(n, T, kv * d, dtype=dtype, scale=3.0, seed=2)
    v = _randn(n, T, kv * d, dtype=dtype, seed=3)
    pos = torch.randperm(columns - 1, generator=torch.Generator().manual_seed(4))[: n * T].view(n, T).to(DEV)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    freqs = pos.unsqueeze(-1).float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    rows = torch.tensor([4, 0, 2][:n], device=DEV).unsqueeze(1).expand(n, T)
    scale = d ** -0.5
    # the caches as views of one buffer, as SlotCache holds them
    kv_buf = _randn(2, 2, slots, kv, columns, d, dtype=dtype, seed=5)
    want_k, want_v = kv_buf[1, 0].clone(), kv_buf[1, 1].clone()
    q4 = q.view(n, T, heads, d).transpose(1, 2)
    k4 = k.view(n, T, kv, d).transpose(1, 2)
    want_q = _rotate(q4, cos, sin) * scale
    rot_k = _rotate(k4, cos, sin)
    assert_bitwise(small_ops.rope_reference(q4, cos, sin), _rotate(q4, cos, sin))
    hf_q, hf_k = apply_rotary_pos_emb(q4, k4, cos, sin)
    assert_bitwise(hf_q, _rotate(q4, cos, sin))
    assert_bitwise(hf_k, rot_k)
    want_k[rows, :, pos] = rot_k.transpose(1, 2)
    want_v[rows, :, pos] = v.view(n, T, kv, d)

    got_q = small_ops.rope_qkv_cache(q, k, v, cos, sin, scale, kv_buf[1, 0], kv_buf[1, 1], rows, pos)
    assert_bitwise(got_q, want_q.contiguous())
    assert_bitwise(kv_buf[1, 0], want_k)  # written columns, and every other column untouched
    assert_bitwise(kv_buf[1, 1], want_v)


def _model(arch: str, dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_model(arch).to(DEV, dtype)
    with torch.no_grad():  # norm weights away from their initial ones, so the weight product counts
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _steps(step: LlamaStep) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A prefill of 2 rows into slots 1 and 0 (5 and 3 real tokens, the short row padded into
    the scratch column), then two decode steps; the logits of each, and the cache."""
    cache = step.new_cache(3)
    cache.ready(16)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 100, (2, 5), generator=g).to(DEV)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 2, 2]], device=DEV)
    write = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, cache.scratch, cache.scratch]], device=DEV)
    logits = [step.forward(cache, ids, pos, write, torch.tensor([4, 2], device=DEV), 16,
                           torch.tensor([1, 0], device=DEV))]
    for t in range(2):  # decode: row r is slot r (slot 0: 3 tokens so far, slot 1: 5)
        ids = torch.randint(3, 100, (2, 1), generator=g).to(DEV)
        pos = torch.tensor([[3 + t], [5 + t]], device=DEV)
        logits.append(step.forward(cache, ids, pos, pos, torch.zeros(2, dtype=torch.long, device=DEV), 16))
    return logits, cache.kv[:, :, :, :, :16]  # the columns made readable (the rest: never written)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_step_with_fused_ops_is_bitwise_the_pytorch_forward(arch, dtype):
    model = _model(arch, dtype)
    assert fused_reason(model) is None
    fused, plain = LlamaStep(model, 32, fused=True), LlamaStep(model, 32, fused=False)
    assert fused.fused and not plain.fused
    with torch.no_grad():
        got, got_cache = _steps(fused)
        want, want_cache = _steps(plain)
    for g, w in zip(got, want):
        assert torch.isfinite(w).all()
        assert_bitwise(g, w)
    assert_bitwise(got_cache, want_cache)


def test_fused_ops_run_only_when_asked_for_and_asking_names_why_not():
    model = tiny_model("llama")  # float32
    assert "float32" in fused_reason(model)
    assert not LlamaStep(model, 32).fused
    with pytest.raises(ValueError, match="fused small ops"):
        LlamaStep(model, 32, fused=True)
    half = tiny_model("llama").to(DEV, torch.float16)
    assert not LlamaStep(half, 32).fused and LlamaStep(half, 32, fused=True).fused
    half.model.norm.register_forward_hook(lambda *args: None)  # behaviour a kernel would skip
    assert "RMSNorm" in fused_reason(half)
    with pytest.raises(ValueError, match="RMSNorm"):
        LlamaStep(half, 32, fused=True)


def test_the_engine_runs_the_fused_ops_only_on_cuda_and_when_configured():
    from libortho.serve.config import ServeConfig
    from libortho.serve.slot_runner import SlotRunner
    half = tiny_model("llama").to(DEV, torch.float16)
    assert not SlotRunner(half, ServeConfig(max_batch=2), 32).step.fused
    on = SlotRunner(half, ServeConfig(max_batch=2, fused_small_ops=True), 32).step.fused
    assert on == (DEV == "cuda")
