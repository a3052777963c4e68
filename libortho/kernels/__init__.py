"""Fused dual-stream GPU kernels for OrthoLinear.

Public API (used by ``libortho.layer.OrthoLinear`` on CUDA)::

    available() -> bool
    dual_stream_linear(x, layer, alpha, *, out=None, config=None) -> Tensor
    prepare(module) -> int          # build kernel layouts before CUDA-graph capture

``dual_stream_linear`` computes Y = X·W_baseᵀ + alpha·X·W_orthoᵀ + bias in one launch:
Triton kernels for 3/4-bit (nibble containers), 2-bit and 8-bit codes with power-of-two
group sizes; anything else falls back to a dequantize + matmul in PyTorch. Decode with up to
4 token rows on symmetric nibble layers takes the v2 kernel (``_gemv2_kernel``).
Scalar alpha == 0 takes the base-only kernel (the ortho buffers are not read).

Where things live: dispatch.py (kernel choice and launch), launch.py (split-K and ortho
chunk sizing), configs.py (tile configs), layout.py (kernel-side layout of a layer),
triton_kernels.py (the kernels: gemv2.py, v1.py and their shared helpers),
reference.py (PyTorch reference and fallback), synthetic.py (random layers). Apart from the
linear layers: small_ops.py, the fused elementwise ops of the serving engine's decoder forward
(residual add + RMSNorm, RoPE + KV-cache writes), imported by libortho.serve.llama_step on CUDA.
"""
from __future__ import annotations

from .configs import Config, default_config, select_config  # noqa: F401 (public: tile configs)
from .dispatch import available, dual_stream_linear, interpret_mode, prepare, supports, torch_dual_stream
from .layout import KernelLayout, get_layout  # noqa: F401 (public: the kernel-side layout)
from .reference import dequantize, ortho_dense, reference_dual_stream

__all__ = ["available", "dual_stream_linear", "prepare", "supports", "interpret_mode", "reference_dual_stream",
           "torch_dual_stream", "dequantize", "ortho_dense"]
