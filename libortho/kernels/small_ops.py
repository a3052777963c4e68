"""Fused elementwise ops of the Llama decoder forward, bitwise equal to transformers' PyTorch.

A decode step of a small model is dominated by launches, not by arithmetic: every block runs
two RMSNorms (8 kernels each in PyTorch), RoPE on q and k (5 each), the scale of q and two cache
scatters. These kernels do the same arithmetic in fewer launches, rounding every intermediate
exactly where PyTorch rounds it (a product of two 16-bit floats to 16 bits before the sum it
enters, and so on), so their outputs are BITWISE those of the PyTorch expressions they replace:

* `add_rms_norm`: h + delta, then RMSNorm as transformers' LlamaRMSNorm (also Qwen2's and
  Mistral's) computes it, in 3 launches instead of 9 (1 add + 8). The mean of the squares stays
  a PyTorch reduction: its float32 sum order is PyTorch's own (it differs between devices and
  with the number of rows), and any other order changes the last bit of the variance, which
  then changes some outputs' rounding. What is fused is everything around it.
* `rope_qkv_cache`: RoPE of q and k (rotate_half convention), q times the attention scale, and
  the writes of k and v into the slot cache: 1 launch instead of 13.

Left out: SiLU(gate)·up. PyTorch's silu calls the platform's expf (SLEEF on the CPU, CUDA's
libm on the GPU); the Triton interpreter's exp is numpy's, which differs from SLEEF in the last
bit of about 40 % of float32 inputs, so the kernel's equality could not be shown under the
interpreter. The softmax is left out for the same reason as the variance (a sum whose order is
PyTorch's).

Each kernel is used on CUDA with fp16/bf16 tensors (and on the CPU under TRITON_INTERPRET=1, in
the tests). The interpreter rounds float32 to bfloat16 by truncation, the GPU to nearest even:
`_round_to` rounds to bfloat16 with integer arithmetic, identical on both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16)


# ---- PyTorch references: the expressions the kernels replace ----------------------------------

def rms_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward (Qwen2RMSNorm, MistralRMSNorm: the same code).

    h: [..., H] fp16/bf16; weight: [H], h's dtype; eps: the module's variance_epsilon.
    Returns [..., H] in h's dtype."""
    x = h.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(h.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, transformers' apply_rotary_pos_emb (rotate_half convention).

    x: [n, heads, T, d]; cos, sin: [n, T, d], x's dtype. Returns [n, heads, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# ---- kernels ----------------------------------------------------------------------------------

@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE, to nearest even (as PyTorch's casts round)."""
    if DTYPE == tl.bfloat16:
        # the interpreter's cast truncates: round the top 16 bits with integer arithmetic
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000  # rounding its bits could make a NaN infinite
        return tl.where(nan, x.to(tl.bfloat16), rounded)
    else:
        return x.to(DTYPE)


@triton.jit
def _add_square_kernel(h_ptr, d_ptr, h_out_ptr, sq_ptr, H, ADD: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: h_out = h + d (in h's dtype; only when ADD), sq = float32(h_out)² (exact)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < H
    h = tl.load(h_ptr + r * H + cols, mask=keep).to(tl.float32)
    if ADD:
        d = tl.load(d_ptr + r * H + cols, mask=keep).to(tl.float32)
        h = _round_to(h + d, h_out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_out_ptr + r * H + cols, h.to(h_out_ptr.dtype.element_ty), mask=keep)
    tl.store(sq_ptr + r * H + cols, h * h, mask=keep)


@triton.jit
def _rms_scale_kernel(h_ptr, var_ptr, w_ptr, out_ptr, eps, H, BLOCK: tl.constexpr):
    """Row r: out = w * round(float32(h) * rsqrt(var[r] + eps)), rounded as LlamaRMSNorm."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < H
    dt = out_ptr.dtype.element_ty
    h = tl.load(h_ptr + r * H + cols, mask=keep).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=keep).to(tl.float32)
    inv = tl.math.rsqrt(tl.load(var_ptr + r) + eps)  # two float32 roundings, as add then rsqrt
    x = _round_to(h * inv, dt).to(tl.float32)
    tl.store(out_ptr + r * H + cols, _round_to(w * x, dt), mask=keep)


@triton.jit
def _rope_qkv_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, rows_ptr, write_ptr,
                           q_out_ptr, k_cache_ptr, v_cache_ptr, scale, T,
                           stride_slot, stride_head, stride_col,
                           NH: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Token b (row b // T, token b % T), head j of q (j < NH), k or v: RoPE(q)·scale ->
    q_out[row, j, token]; RoPE(k), v -> column write[b] of slot rows[b] of the cache."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    dt = q_out_ptr.dtype.element_ty
    HALF: tl.constexpr = D // 2
    lo = tl.arange(0, BLOCK)
    keep = lo < HALF
    if j < NH:
        src = q_ptr + (b * NH + j) * D
    elif j < NH + KV:
        src = k_ptr + (b * KV + (j - NH)) * D
    else:
        src = v_ptr + (b * KV + (j - NH - KV)) * D
    x1 = tl.load(src + lo, mask=keep).to(tl.float32)
    x2 = tl.load(src + HALF + lo, mask=keep).to(tl.float32)
    if j < NH + KV:
        # x·cos + rotate_half(x)·sin: each product rounded to dt before the sum, as PyTorch's
        # three kernels round (the rounding also keeps the compiler from fusing them into an FMA)
        c1 = tl.load(cos_ptr + b * D + lo, mask=keep).to(tl.float32)
        c2 = tl.load(cos_ptr + b * D + HALF + lo, mask=keep).to(tl.float32)
        s1 = tl.load(sin_ptr + b * D + lo, mask=keep).to(tl.float32)
        s2 = tl.load(sin_ptr + b * D + HALF + lo, mask=keep).to(tl.float32)
        y1 = _round_to(_round_to(x1 * c1, dt).to(tl.float32) + _round_to(-x2 * s1, dt).to(tl.float32), dt)
        y2 = _round_to(_round_to(x2 * c2, dt).to(tl.float32) + _round_to(x1 * s2, dt).to(tl.float32), dt)
    else:
        y1 = x1.to(dt)  # v: a copy (exact)
        y2 = x2.to(dt)
    if j < NH:
        y1 = _round_to(y1.to(tl.float32) * scale, dt)  # PyTorch: q * scale, the scale in float32
        y2 = _round_to(y2.to(tl.float32) * scale, dt)
        row, token = b // T, b % T
        dst = q_out_ptr + ((row * NH + j) * T + token) * D
    else:
        slot = tl.load(rows_ptr + b)
        col = tl.load(write_ptr + b)
        if j < NH + KV:
            dst = k_cache_ptr + (j - NH) * stride_head
        else:
            dst = v_cache_ptr + (j - NH - KV) * stride_head
        dst += slot * stride_slot + col * stride_col
    tl.store(dst + lo, y1, mask=keep)
    tl.store(dst + HALF + lo, y2, mask=keep)


# ---- launchers --------------------------------------------------------------------------------

def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, RMSNorm(h + delta)), bitwise `h + delta` and `rms_norm_reference` of it.

    h, delta: [..., H] fp16/bf16, one dtype (delta None: no add, h returned as is);
    weight: [H], h's dtype; eps: the norm's variance_epsilon.
    Returns (h_new [..., H], out [..., H]), h's dtype. Three launches: add and square, PyTorch's
    own mean of the squares (its float32 sum order), scale."""
    h = h.contiguous()  # rows of H adjacent elements (the forward's tensors already are)
    delta = None if delta is None else delta.contiguous()
    H = h.shape[-1]
    rows = h.numel() // H
    block = triton.next_power_of_2(H)
    h_new = h if delta is None else torch.empty_like(h)
    sq = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    _add_square_kernel[(rows,)](h, h if delta is None else delta, h_new, sq, H,
                                ADD=delta is not None, BLOCK=block)
    variance = sq.mean(-1, keepdim=True)  # the reduction of the reference, on the same float32 values
    out = torch.empty_like(h)
    _rms_scale_kernel[(rows,)](h_new, variance, weight, out, eps, H, BLOCK=block)
    return h_new, out


def rope_qkv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   scale: float, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                   write: torch.Tensor) -> torch.Tensor:
    """RoPE and scale of q, RoPE of k, and the cache writes of k and v, in one launch.

    q: [n, T, nh·d]; k, v: [n, T, kv·d] (the projections' outputs); cos, sin: [n, T, d]; all
    one dtype, fp16/bf16. scale: the attention scale (applied in
    float32, as `q * scale` does). k_cache, v_cache: [slots, kv, columns, d], the same strides,
    last one 1. rows, write: [n, T] int64: slot and column of each token's k and v.
    Returns q_out [n, nh, T, d] contiguous = `rope_reference(q) * scale`, bitwise; the cache
    afterwards holds what `cache[rows, :, write] = rope_reference(k)` (and v) writes."""
    n, T, _ = q.shape
    kv, d = k_cache.shape[1], k_cache.shape[3]
    nh = q.shape[-1] // d
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    q_out = torch.empty((n, nh, T, d), dtype=q.dtype, device=q.device)
    # the kernel indexes each by token: no-ops for the forward's tensors, except the expanded rows
    q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
    rows, write = rows.contiguous(), write.contiguous()
    _rope_qkv_cache_kernel[(n * T, nh + 2 * kv)](
        q, k, v, cos, sin, rows, write, q_out, k_cache, v_cache, scale, T,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NH=nh, KV=kv, D=d, BLOCK=triton.next_power_of_2(d // 2))
    return q_out
