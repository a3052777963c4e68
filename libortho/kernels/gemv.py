"""Decode kernel v1 (``_gemv_kernel``): 1–2 token rows per program on CUDA cores, for the
layouts the v2 kernel does not take (asymmetric zeros, 2/8-bit codes, K not a whole number of
v2 tiles). Operands: see libortho/kernels/triton_kernels.py."""
from __future__ import annotations

import triton
import triton.language as tl

from .codes import _codes, _group_params, _load_words, _x_halves
from .ortho import _csr_gather, _csr_slice
from .tile import _finish, _tile_ids


@triton.jit
def _x_pairs4(x32_ptr, k0, rw, K, EVEN: tl.constexpr):
    """x of the K tile at k0 as four int32 [BKW] tensors: pair i2 of word j holds
    x[k0 + 8j + 2·i2] (low half) and x[k0 + 8j + 2·i2 + 1] (high half). 8 codes per word."""
    idx = k0 // 2 + rw * 4
    if EVEN:
        u0 = tl.load(x32_ptr + idx)
        u1 = tl.load(x32_ptr + idx + 1)
        u2 = tl.load(x32_ptr + idx + 2)
        u3 = tl.load(x32_ptr + idx + 3)
    else:
        lim = K // 2
        u0 = tl.load(x32_ptr + idx, mask=idx < lim, other=0)
        u1 = tl.load(x32_ptr + idx + 1, mask=idx + 1 < lim, other=0)
        u2 = tl.load(x32_ptr + idx + 2, mask=idx + 2 < lim, other=0)
        u3 = tl.load(x32_ptr + idx + 3, mask=idx + 3 < lim, other=0)
    return u0, u1, u2, u3



@triton.jit
def _x_cols(x_row_ptr, kk, K, EVEN: tl.constexpr):
    """x[kk] of one token row as fp32 (0 past K unless EVEN)."""
    if EVEN:
        return tl.load(x_row_ptr + kk).to(tl.float32)
    else:
        return tl.load(x_row_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)

@triton.jit
def _fma_pair(q, i2: tl.constexpr, xp, p, xs, onebits, CBITS: tl.constexpr,
              XBF16: tl.constexpr):
    """p += f(code 2·i2)·x_lo + f(code 2·i2+1)·x_hi (two FFMAs); xs += x_lo + x_hi."""
    xa, xb = _x_halves(xp, XBF16)
    p += _codes(q, 2 * i2, onebits, CBITS) * xa[None, :]
    p += _codes(q, 2 * i2 + 1, onebits, CBITS) * xb[None, :]
    return p, xs + xa + xb



@triton.jit
def _fma_word(q, u0, u1, u2, u3, p, xs, onebits, CBITS: tl.constexpr, XBF16: tl.constexpr):
    """All 8 codes of each word of q against one token row's x pairs u0..u3 (``_x_pairs4``):
    p [BN, BKW] += f·x per code slot, xs [BKW] += Σ x (see ``_fma_pair``)."""
    p, xs = _fma_pair(q, 0, u0, p, xs, onebits, CBITS, XBF16)
    p, xs = _fma_pair(q, 1, u1, p, xs, onebits, CBITS, XBF16)
    p, xs = _fma_pair(q, 2, u2, p, xs, onebits, CBITS, XBF16)
    p, xs = _fma_pair(q, 3, u3, p, xs, onebits, CBITS, XBF16)
    return p, xs


# The leading parameters are _gemm_kernel's (kernels/gemm.py): launch.py passes both kernels the
# same arguments, and triton.jit needs every parameter spelled out.
@triton.jit(do_not_specialize=["KW"])
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, crow_ptr, col_ptr, val_ptr, a_ptr, y_ptr,
                 ws_ptr, cnt_ptr, alpha, zconst, onebits, M, N, K, KW, G, stride_xm, stride_ym,
                 KPS, SPLIT,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
                 CBITS: tl.constexpr, ZCONST: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ORTHO: tl.constexpr, ALPHA_VEC: tl.constexpr, E: tl.constexpr,
                 USE_SPLIT: tl.constexpr, EVEN: tl.constexpr, XPF: tl.constexpr,
                 XBF16: tl.constexpr):
    """Decode kernel, BM = 1 or 2 token rows per program, CUDA-core FMAs.

    Grid: (cdiv(M, BM), cdiv(N, BN), SPLIT); program (m, n, k) covers columns
    [k·KPS, (k+1)·KPS) and the k-th of SPLIT equal slices of each of its rows' ortho entries.
    Works on the [BN, BKW] word tile in its load layout: for each code slot i of a word,
    p += f_i·x[k0 + EPW·j + i] (f = 1 + c/2^CBITS, one FFMA per weight); per word,
    acc += sa·p − sb·Σ_i x = s·Σ_i x·(c − z). One cross-thread reduction at the very end.
    KW is not specialised, so the word loads stay 4 B wide: with BKW ≤ 8 a thread holds
    several rows of the same word and they share its x loads.
    EVEN: N % BN == 0 and K % BK == 0 (no masks in the main loop).
    XPF (4-bit containers, K and the row stride even): x is read as int32 pairs of 16-bit
    values and prefetched with the words; XBF16: they are bf16 (fp32 = bits << 16), else fp16.
    """
    EPW: tl.constexpr = 32 // CBITS
    BKW: tl.constexpr = BK // EPW
    pid_m, pid_n, pid_k, rn, mn = _tile_ids(N, BN)
    rw = tl.arange(0, BKW)
    q_ptrs = qw_ptr + rn[:, None] * KW + rw[None, :]
    m0 = pid_m * BM
    m1 = tl.minimum(m0 + 1, M - 1)  # a missing second row re-reads row m0 (never stored)
    x0_ptr = x_ptr + m0 * stride_xm
    x1_ptr = x_ptr + m1 * stride_xm
    if XPF:
        x0_32 = x_ptr.to(tl.pointer_type(tl.int32)) + m0 * (stride_xm // 2)
        x1_32 = x_ptr.to(tl.pointer_type(tl.int32)) + m1 * (stride_xm // 2)
    acc0 = tl.zeros((BN, BKW), dtype=tl.float32)
    acc1 = tl.zeros((BN, BKW), dtype=tl.float32)
    k_lo = pid_k * KPS
    k_hi = tl.minimum(K, k_lo + KPS)
    if HAS_ORTHO:  # issue the ortho loads before the main loop, reduce them after it
        lo, hi = _csr_slice(crow_ptr, rn, mn, pid_k, SPLIT)
        longest = tl.max(hi - lo, axis=0)
        col, val, pm, g0 = _csr_gather(x0_ptr, mn, col_ptr, val_ptr, lo, hi, 0, E, False,
                                       VAL_FIRST=True)
        if BM == 2:
            g1 = tl.load(x1_ptr + col, mask=pm, other=0.0)
    # Software pipelining by hand, one K tile ahead in registers: the word tile, group
    # constants and (XPF) x pairs of iteration t+1 are loaded before iteration t computes.
    # (tl.range(num_stages=...) pipelines them through shared memory with cp.async instead;
    # measured slower here, see docs/kernel_notes.md.)
    k_last = k_lo + (k_hi - 1 - k_lo) // BK * BK  # start of this split's last K tile
    q_n = _load_words(q_ptrs, k_lo, mn, rw, KW, EPW, EVEN)
    sa_n, sb_n = _group_params(s_ptr, z_ptr, rn, mn, k_lo, rw, G, zconst, EPW, GS, BK, CBITS,
                               ZCONST)
    if XPF:
        u0n, u1n, u2n, u3n = _x_pairs4(x0_32, k_lo, rw, K, EVEN)
        if BM == 2:
            v0n, v1n, v2n, v3n = _x_pairs4(x1_32, k_lo, rw, K, EVEN)
    for k0 in range(k_lo, k_hi, BK):
        q = q_n
        sa = sa_n
        sb = sb_n
        k1 = tl.minimum(k0 + BK, k_last)  # after the last tile: harmless re-read of it
        q_n = _load_words(q_ptrs, k1, mn, rw, KW, EPW, EVEN)
        sa_n, sb_n = _group_params(s_ptr, z_ptr, rn, mn, k1, rw, G, zconst, EPW, GS, BK, CBITS,
                                   ZCONST)
        p0 = tl.zeros((BN, BKW), dtype=tl.float32)
        xs0 = tl.zeros((BKW,), dtype=tl.float32)
        if BM == 2:
            p1 = tl.zeros((BN, BKW), dtype=tl.float32)
            xs1 = tl.zeros((BKW,), dtype=tl.float32)
        if XPF:
            u0, u1, u2, u3 = u0n, u1n, u2n, u3n
            u0n, u1n, u2n, u3n = _x_pairs4(x0_32, k1, rw, K, EVEN)
            p0, xs0 = _fma_word(q, u0, u1, u2, u3, p0, xs0, onebits, CBITS, XBF16)
            if BM == 2:
                v0, v1, v2, v3 = v0n, v1n, v2n, v3n
                v0n, v1n, v2n, v3n = _x_pairs4(x1_32, k1, rw, K, EVEN)
                p1, xs1 = _fma_word(q, v0, v1, v2, v3, p1, xs1, onebits, CBITS, XBF16)
        else:
            for i in tl.static_range(EPW):
                kk = k0 + rw * EPW + i
                f = _codes(q, i, onebits, CBITS)
                xv = _x_cols(x0_ptr, kk, K, EVEN)
                p0 += f * xv[None, :]
                xs0 += xv
                if BM == 2:
                    xv1 = _x_cols(x1_ptr, kk, K, EVEN)
                    p1 += f * xv1[None, :]
                    xs1 += xv1
        acc0 += sa * p0 - sb * xs0[None, :]
        if BM == 2:
            acc1 += sa * p1 - sb * xs1[None, :]
    y0 = tl.sum(acc0, axis=1)
    if BM == 2:
        y1 = tl.sum(acc1, axis=1)
    if HAS_ORTHO:
        o0 = val * g0.to(tl.float32)
        if BM == 2:
            o1 = val * g1.to(tl.float32)
        for j0 in range(E, longest, E):  # rows longer than E entries in this slice
            col, val, pm, g = _csr_gather(x0_ptr, mn, col_ptr, val_ptr, lo, hi, j0, E, False)
            o0 += val * g.to(tl.float32)
            if BM == 2:
                o1 += val * tl.load(x1_ptr + col, mask=pm, other=0.0).to(tl.float32)
        if ALPHA_VEC:
            a0 = tl.load(a_ptr + m0).to(tl.float32)
        else:
            a0 = alpha
        y0 += a0 * tl.sum(o0, axis=1)
        if BM == 2:
            if ALPHA_VEC:
                a1 = tl.load(a_ptr + m1).to(tl.float32)
            else:
                a1 = alpha
            y1 += a1 * tl.sum(o1, axis=1)
    rm = m0 + tl.arange(0, BM)
    if BM == 2:
        acc = tl.trans(tl.join(y0, y1))
    else:
        acc = y0[None, :]
    tile = pid_n * tl.num_programs(0) + pid_m
    _finish(acc, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rm < M, rn, mn, stride_ym, tile, pid_k,
            SPLIT, USE_SPLIT, HAS_BIAS, BM, BN)

