"""The low-rank ortho part read from its integer codes: Y += alpha·(X·Âᵀ)·B̂ᵀ, with Â and B̂ never
held in fp16.

A coded L (``OrthoConfig.lowrank_bits`` 4 or 8, `lowrank.code_factors`) is stored by
`layer.OrthoLinear` as

    ortho_Aq   [r, ceil(K / PB)] uint8   codes of A  [r, K], PB = 8 / bits codes per byte, low bits first
    ortho_Aq_scales, ortho_Aq_zeros [r, ceil(K / G)] fp16     Â[i, k] = (c − z[i, k // G])·s[i, k // G]
    ortho_Btq  [r, ceil(N / PB)] uint8   codes of Bᵀ [r, N], groups of G along N (G = LOWRANK_GROUP)
    ortho_Btq_scales, ortho_Btq_zeros [r, ceil(N / G)] fp16

Turning the codes into fp16 factors once per device costs what fp16 factors of that rank cost, about
3.6× the codes' bytes at 4 bits. These two kernels dequantise tiles in registers instead:

    _xa_kernel   Zp [S, M, r] fp32 = X[:, split s] · Â[:, split s]ᵀ      grid (cdiv(r, BR), S, cdiv(M, BM))
    _zb_kernel   Y [M, N] += alpha[m] · round(Σ_s Zp[s]) · B̂ᵀ          grid (cdiv(N, BN), cdiv(M, BM))

Off by default: ``LIBORTHO_LOWRANK_CODES=1`` in the environment or ``set_enabled(True)`` makes
`layer.OrthoLinear` take these kernels on CUDA; otherwise it turns the codes into fp16 factors once per
device and runs two thin GEMMs. On one H100 (docs/lowrank_codes/README.md § 7) the first version of these
kernels matched that path on SmolLM2 (decode step 5.60 against 5.65 ms for fp16 L of the same bytes) but
added 64–184 µs per layer at Llama-3-8B shapes, 6–13× the fp16 path's cost; this version (wide byte
loads, an unrolled split sum, larger tiles) has not been timed on a GPU yet.

K is split S ways so that a thin A (r rows) still spreads over the SMs; the partial sums are added
in a fixed order by the second kernel (deterministic, no atomics). Z is rounded to X's dtype before
the second product, as the two thin GEMMs of the fp16 path round it. Each dequantised value is
(c − z)·s computed in fp32 and rounded to X's dtype, which equals the fp16 product the PyTorch path
forms (both operands are exact in fp16; their fp32 product is exact). Accumulation is fp32.
"""
from __future__ import annotations

import functools
from typing import Any, Union

import torch
import triton
import triton.language as tl

from ..lowrank import LOWRANK_GROUP
from ..packing import codes_per_byte
from .dispatch import _env_flag, interpret_mode

Alpha = Union[float, torch.Tensor]

XA_BR, XA_BK = 32, 256  # first kernel: rank rows x K columns of A per tile (tl.dot needs >= 16 each)
ZB_BR, ZB_BN = 64, 64  # second kernel: rank rows per step x output columns per program
MAX_SPLITS = 16  # the second kernel sums the partials in an unrolled loop

ENABLED = _env_flag("LIBORTHO_LOWRANK_CODES", default=False)


def set_enabled(enabled: bool) -> None:
    """Make OrthoLinear read coded L through these kernels on CUDA (True) or through fp16 factors made once
    per device (False, the default; ``LIBORTHO_LOWRANK_CODES=1`` switches it on at import)."""
    global ENABLED
    ENABLED = bool(enabled)


def supported(layer: Any) -> bool:
    """Whether the layer holds a coded low-rank part these kernels read (4- or 8-bit codes, rank > 0)."""
    return int(getattr(layer, "lowrank_bits", 16)) in (4, 8) and int(layer.ortho_rank) > 0


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _split_k(k: int, r: int, m_blocks: int, device: torch.device) -> int:
    """Enough (rank tile, K split) programs for about two waves of SMs, each split at least two tiles long."""
    sms = _sm_count(device)
    programs = triton.cdiv(r, XA_BR) * m_blocks
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(k, 2 * XA_BK), MAX_SPLITS))


@triton.jit
def _dequant(q_ptr, s_ptr, z_ptr, rows, col0, n_rows, n_cols, q_stride, g_stride,
             BC: tl.constexpr, G: tl.constexpr, PB: tl.constexpr, DT: tl.constexpr):
    """Values [len(rows), BC] in DT of columns [col0, col0 + BC) of a packed code matrix, (c − z)·s; zero in
    rows past n_rows, undefined in columns past n_cols (the callers mask x there, or the store). The tile's
    bytes are read as one contiguous [rows, BC / PB] block (wide loads); 4-bit codes (PB 2) are split in
    registers and interleaved back into column order (low nibble first, as packing.pack)."""
    BB: tl.constexpr = BC // PB
    bcols = col0 // PB + tl.arange(0, BB)
    bmask = (rows < n_rows)[:, None] & (bcols < (n_cols + PB - 1) // PB)[None, :]
    byte = tl.load(q_ptr + rows[:, None] * q_stride + bcols[None, :], mask=bmask, other=0).to(tl.int32)
    if PB == 2:
        code = tl.reshape(tl.join(byte & 15, byte >> 4), (byte.shape[0], BC))
    else:
        code = byte
    # one scale and zero per group of G columns, loaded once and widened in registers (BC is a multiple of G)
    tl.static_assert(BC % G == 0)
    NG: tl.constexpr = BC // G
    gcols = col0 // G + tl.arange(0, NG)
    gmask = (rows < n_rows)[:, None] & (gcols < (n_cols + G - 1) // G)[None, :]
    goff = rows[:, None] * g_stride + gcols[None, :]
    s = tl.load(s_ptr + goff, mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + goff, mask=gmask, other=0.0).to(tl.float32)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (s.shape[0], NG, G)), (s.shape[0], BC))
    z = tl.reshape(tl.broadcast_to(z[:, :, None], (z.shape[0], NG, G)), (z.shape[0], BC))
    return ((code.to(tl.float32) - z) * s).to(DT)


@triton.jit
def _xa_kernel(x_ptr, q_ptr, s_ptr, z_ptr, zp_ptr, M, K, R, x_stride, q_stride, g_stride, k_per_split,
               G: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
               DOT_F32: tl.constexpr):
    pid_r, split, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BR + tl.arange(0, BR)
    rm = pid_m * BM + tl.arange(0, BM)
    DT = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * x_stride + cols[None, :],
                    mask=(rm < M)[:, None] & (cols < K)[None, :], other=0.0)
        a = _dequant(q_ptr, s_ptr, z_ptr, rows, k0, R, K, q_stride, g_stride, BK, G, PB, DT)
        if DOT_F32:  # Triton 3.9's interpreter computes bf16 dots wrongly (kernel_notes.md)
            x, a = x.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(x, tl.trans(a))
    out = zp_ptr + split * M * R + rm[:, None] * R + rows[None, :]
    tl.store(out, acc, mask=(rm < M)[:, None] & (rows < R)[None, :])


@triton.jit
def _zb_kernel(zp_ptr, q_ptr, s_ptr, z_ptr, y_ptr, alpha_ptr, alpha, M, N, R, y_stride, q_stride,
               g_stride, NSPLIT: tl.constexpr, G: tl.constexpr, PB: tl.constexpr, BM: tl.constexpr,
               BR: tl.constexpr, BN: tl.constexpr, PER_ROW: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    DT = y_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        zmask = (rm < M)[:, None] & (rr < R)[None, :]
        z = tl.zeros((BM, BR), dtype=tl.float32)
        for s in tl.static_range(NSPLIT):  # fixed order: the same bits whatever the grid's timing
            z += tl.load(zp_ptr + s * M * R + rm[:, None] * R + rr[None, :], mask=zmask, other=0.0)
        b = _dequant(q_ptr, s_ptr, z_ptr, rr, pid_n * BN, R, N, q_stride, g_stride, BN, G, PB, DT)
        z = z.to(DT)
        if DOT_F32:
            z, b = z.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(z, b)
    if PER_ROW:
        acc = acc * tl.load(alpha_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)[:, None]
    else:
        acc = acc * alpha
    ymask = (rm < M)[:, None] & (cols < N)[None, :]
    yp = y_ptr + rm[:, None] * y_stride + cols[None, :]
    y = tl.load(yp, mask=ymask, other=0.0)
    tl.store(yp, (y.to(tl.float32) + acc.to(DT).to(tl.float32)).to(DT), mask=ymask)


def add_lowrank_codes_(y: torch.Tensor, x: torch.Tensor, layer: Any, alpha: Alpha) -> torch.Tensor:
    """y += alpha·(x·Âᵀ)·B̂ᵀ in place, read from the layer's codes (module docstring).

    x: [M, K] fp16/bf16, unit column stride; y: [M, N] contiguous, x's dtype; alpha: a float, or a
    tensor [M] (one value per row, any float dtype). Returns y. The caller checks `supported(layer)`."""
    m, k = x.shape
    n, r, bits = int(layer.out_features), int(layer.ortho_rank), int(layer.lowrank_bits)
    if y.shape != (m, n) or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError(f"y must be a contiguous [{m}, {n}] {x.dtype} tensor, got {tuple(y.shape)} {y.dtype}")
    if m == 0 or r == 0:
        return y
    if x.stride(-1) != 1:
        x = x.contiguous()
    pb = codes_per_byte(bits)
    dot_f32 = interpret_mode() and x.dtype == torch.bfloat16
    bm = _block_m(m)
    m_blocks = triton.cdiv(m, bm)
    n_splits = _split_k(k, r, m_blocks, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, n_splits), XA_BK) * XA_BK
    n_splits = triton.cdiv(k, k_per_split)
    zp = torch.empty(n_splits, m, r, dtype=torch.float32, device=x.device)
    A, A_s, A_z = layer.ortho_Aq, layer.ortho_Aq_scales, layer.ortho_Aq_zeros
    _xa_kernel[(triton.cdiv(r, XA_BR), n_splits, m_blocks)](
        x, A, A_s, A_z, zp, m, k, r, x.stride(0), A.stride(0), A_s.stride(0), k_per_split,
        G=LOWRANK_GROUP, PB=pb, BM=bm, BR=XA_BR, BK=XA_BK, DOT_F32=dot_f32)
    per_row = isinstance(alpha, torch.Tensor)
    avec = alpha.reshape(-1).to(device=x.device, dtype=torch.float32) if per_row else zp
    if per_row and avec.numel() != m:
        raise ValueError(f"alpha has {avec.numel()} values for {m} rows")
    Bt, B_s, B_z = layer.ortho_Btq, layer.ortho_Btq_scales, layer.ortho_Btq_zeros
    _zb_kernel[(triton.cdiv(n, ZB_BN), m_blocks)](
        zp, Bt, B_s, B_z, y, avec, 0.0 if per_row else float(alpha), m, n, r, y.stride(0),
        Bt.stride(0), B_s.stride(0), NSPLIT=n_splits, G=LOWRANK_GROUP, PB=pb, BM=bm, BR=ZB_BR, BN=ZB_BN,
        PER_ROW=per_row, DOT_F32=dot_f32)
    return y
