"""On CUDA, LlamaStep with the fused small ops (libortho.kernels.small_ops) is BITWISE its
PyTorch forward: the logits and the cache of a prefill and decode steps at 1 and 64 rows, on a
random Llama of SmolLM2-135M's block shape (hidden 576, 9 query and 3 key-value heads of 64),
fp16 and bf16, eagerly and replayed from a CUDA graph. The kernels' own checks against their
references run on the GPU too: ``python -m pytest tests/test_small_ops.py`` on a CUDA machine.

    python -m pytest tests/gpu/test_small_ops_gpu.py
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
pytest.importorskip("triton")

from libortho.serve.llama_step import LlamaStep

MAX_LEN, WIDTH, PROMPT = 64, 32, 7


def _smol_shaped(dtype: torch.dtype, blocks: int = 3) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=blocks,
                         num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         max_position_embeddings=MAX_LEN, rope_theta=100000.0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.to("cuda", dtype)


def _decode_inputs(rows: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 2048, (rows, 1), generator=g).cuda()
    pos = torch.full((rows, 1), PROMPT + t, device="cuda")
    return ids, pos


def _run(step: LlamaStep, rows: int, graph: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefill `rows` prompts of PROMPT tokens into slots 0..rows-1, then 3 decode steps (replayed
    from one captured graph when `graph`); each step's logits and the cache's readable columns."""
    cache = step.new_cache(rows)
    cache.ready(WIDTH)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 2048, (rows, PROMPT), generator=g).cuda()
    pos = torch.arange(PROMPT, device="cuda").expand(rows, PROMPT).contiguous()
    last = torch.full((rows,), PROMPT - 1, device="cuda")
    logits = [step.forward(cache, ids, pos, pos, last, WIDTH, torch.arange(rows, device="cuda"))]
    zero = torch.zeros(rows, dtype=torch.long, device="cuda")
    if not graph:
        for t in range(3):
            ids, pos = _decode_inputs(rows, t, seed=10 + t)
            logits.append(step.forward(cache, ids, pos, pos, zero, WIDTH))
        return logits, cache.kv[..., :WIDTH, :].clone()
    static_ids, static_pos = _decode_inputs(rows, 0, seed=10)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) on a scratch copy of the cache
        saved = cache.kv.clone()
        step.forward(cache, static_ids, static_pos, static_pos, zero, WIDTH)
        cache.kv.copy_(saved)
    torch.cuda.current_stream().wait_stream(stream)
    graph_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_):
        out = step.forward(cache, static_ids, static_pos, static_pos, zero, WIDTH)
    for t in range(3):
        ids, pos = _decode_inputs(rows, t, seed=10 + t)
        static_ids.copy_(ids)
        static_pos.copy_(pos)
        graph_.replay()
        logits.append(out.clone())
    return logits, cache.kv[..., :WIDTH, :].clone()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("graph", [False, True])
def test_fused_small_ops_are_bitwise_the_pytorch_forward_on_cuda(dtype, rows, graph):
    model = _smol_shaped(dtype)
    fused, plain = LlamaStep(model, MAX_LEN, fused=True), LlamaStep(model, MAX_LEN, fused=False)
    with torch.no_grad():
        got, got_cache = _run(fused, rows, graph)
        want, want_cache = _run(plain, rows, graph)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(w).all()
        assert torch.equal(g, w), f"step {i}: largest difference {(g - w).abs().max().item():.3g}"
    assert torch.equal(got_cache.view(torch.int16), want_cache.view(torch.int16))
