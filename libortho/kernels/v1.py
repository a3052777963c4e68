"""The v1 kernel: one Triton program with two main loops, for the layouts and row counts the v2
decode kernel (gemv2.py) does not take. Operands: see libortho/kernels/triton_kernels.py.

* ``_gemv_kernel`` (FMA): 1–2 token rows per program on CUDA cores, one FFMA per weight, for
  decode on asymmetric zeros, 2/8-bit codes, or K not a whole number of v2 tiles.
* ``_gemm_kernel``: tensor cores (``tl.dot``), decode batches of 3 or more rows and prefill;
  dequantizes the word tile to the activation dtype inside the K loop.

Both are the one function ``_v1_program`` compiled twice: the launcher passes them the same
operands, and ``triton.jit`` needs every parameter spelled out, so the parameter list is
written once. The constexpr branch on FMA leaves each compiled kernel only its own loop. The
two differ in one more way: KW is not specialised for FMA, so its word loads stay 4 B wide
and a thread holding several rows of one word shares its x loads (docs/kernel_notes.md).
"""
from __future__ import annotations

import types

import triton
import triton.language as tl

from .codes import _codes, _dequant_tile, _group_params, _load_words, _x_halves
from .launch import interpret_mode
from .ortho import _csr_gather, _csr_slice, _ortho_rows
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


def _v1_program(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, crow_ptr, col_ptr, val_ptr, a_ptr, y_ptr,
                ws_ptr, cnt_ptr, alpha, zconst, onebits, M, N, K, KW, G, stride_xm, stride_ym,
                KPS, SPLIT,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
                CBITS: tl.constexpr, ZCONST: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_ORTHO: tl.constexpr, ALPHA_VEC: tl.constexpr, E: tl.constexpr,
                USE_SPLIT: tl.constexpr, EVEN: tl.constexpr, FMA: tl.constexpr,
                XPF: tl.constexpr = False, XBF16: tl.constexpr = False,
                SWAP: tl.constexpr = False, JOIN: tl.constexpr = False,
                DOT_F32: tl.constexpr = False, ORTHO_ROWS: tl.constexpr = False):
    """Y[M, N] = X·W_baseᵀ + alpha·X·W_orthoᵀ (+ bias) for one [BM, BN] output tile.

    Grid: (cdiv(M, BM), cdiv(N, BN), SPLIT); program (m, n, k) covers columns
    [k·KPS, (k+1)·KPS) and the k-th of SPLIT equal slices of its ortho entries.
    EVEN: N % BN == 0 and K % BK == 0 (no masks in the main loop).

    FMA (decode, BM = 1 or 2 token rows per program, CUDA-core FMAs): works on the [BN, BKW]
    word tile in its load layout: for each code slot i of a word, p += f_i·x[k0 + EPW·j + i]
    (f = 1 + c/2^CBITS, one FFMA per weight); per word, acc += sa·p − sb·Σ_i x =
    s·Σ_i x·(c − z). One cross-thread reduction at the very end. XPF (4-bit containers, K and
    the row stride even): x is read as int32 pairs of 16-bit values and prefetched with the
    words; XBF16: they are bf16 (fp32 = bits << 16), else fp16. Ortho: each row's slice is
    gathered E entries per step, its loads issued before the main loop.

    Otherwise (tiled GEMM on tensor cores, decode batches ≥ 3 and prefill): the M tiles of one
    N tile run back to back so each weight tile comes from HBM once. The K order inside a tile
    is free in a dot product, so code slot i of every word (columns k0 + EPW·j + i, j < BKW) is
    dequantized in the word tile's own layout, w = f·sa − sb, and multiplied with the matching
    strided slice of X: EPW dots of depth BKW ≥ 16 per tile. SWAP computes (W·Xᵀ)ᵀ so that the
    dequantized weights are the MMA's register operand (small BM). JOIN (4/8-bit) instead
    joins the slots in registers into a naturally ordered [BN, BK] tile: one dot per K tile,
    X contiguous. DOT_F32: upcast dot operands to fp32 (only for Triton's CPU interpreter,
    whose bf16 dot is wrong in Triton 3.9). Ortho (ORTHO_ROWS, few rows): each output row's
    entries split evenly over SPLIT and gathered as [BM, BN, E]. Otherwise the tile's CSR
    entries [crow[n0], crow[n0+BN]) are split evenly over SPLIT and walked in chunks of E:
    gathered X [BM, E] times a one-hot-scaled [E, BN] scatter matrix (tl.dot).
    """
    EPW: tl.constexpr = 32 // CBITS
    BKW: tl.constexpr = BK // EPW
    pid_m, pid_n, pid_k, rn, mn = _tile_ids(N, BN)
    if FMA:
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
    else:
        rm = pid_m * BM + tl.arange(0, BM)
        mm = rm < M
        rw = tl.arange(0, BKW)
        xdt = x_ptr.dtype.element_ty
        if DOT_F32:
            xdt = tl.float32
        if SWAP:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        q_ptrs = qw_ptr + rn[:, None] * KW + rw[None, :]
        x_rows = x_ptr + rm[:, None] * stride_xm
        k_lo = pid_k * KPS
        k_hi = tl.minimum(K, k_lo + KPS)
        rk = tl.arange(0, BK)
        for k0 in range(k_lo, k_hi, BK):
            kw0 = k0 // EPW
            if EVEN:
                q = tl.load(q_ptrs + kw0)
            else:
                q = tl.load(q_ptrs + kw0, mask=mn[:, None] & ((kw0 + rw) < KW)[None, :], other=0)
            sa, sb = _group_params(s_ptr, z_ptr, rn, mn, k0, rw, G, zconst, EPW, GS, BK, CBITS,
                                   ZCONST)
            if JOIN:
                w = _dequant_tile(q, sa, sb, onebits, CBITS, BN, BKW, xdt)  # [BN, BK]
                if EVEN:
                    x = tl.load(x_rows + (k0 + rk)[None, :], mask=mm[:, None], other=0.0)
                else:
                    x = tl.load(x_rows + (k0 + rk)[None, :],
                                mask=mm[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
                x = x.to(xdt)
                if SWAP:
                    acc = tl.dot(w, tl.trans(x), acc)
                else:
                    acc = tl.dot(x, tl.trans(w), acc)
            else:
                for i in tl.static_range(EPW):
                    kk = k0 + rw * EPW + i
                    w = (_codes(q, i, onebits, CBITS) * sa - sb).to(xdt)  # [BN, BKW] = (c - z)·s
                    x = tl.load(x_rows + kk[None, :], mask=mm[:, None] & (kk < K)[None, :],
                                other=0.0).to(xdt)
                    if SWAP:
                        acc = tl.dot(w, tl.trans(x), acc)
                    else:
                        acc = tl.dot(x, tl.trans(w), acc)
        if SWAP:
            acc = tl.trans(acc)
        if HAS_ORTHO and ORTHO_ROWS:
            o = _ortho_rows(x_rows, mm, rn, mn, crow_ptr, col_ptr, val_ptr, pid_k, SPLIT, BM, BN, E)
            if ALPHA_VEC:
                a = tl.load(a_ptr + rm, mask=mm, other=0.0).to(tl.float32)
                acc += a[:, None] * o
            else:
                acc += alpha * o
        if HAS_ORTHO and not ORTHO_ROWS:
            rs = tl.load(crow_ptr + rn, mask=mn, other=0)
            re = tl.load(crow_ptr + rn + 1, mask=mn, other=0)
            t0 = tl.load(crow_ptr + pid_n * BN)
            t1 = tl.load(crow_ptr + tl.minimum(pid_n * BN + BN, N))
            chunk = (t1 - t0 + SPLIT - 1) // SPLIT
            lo = t0 + pid_k * chunk
            hi = tl.minimum(t1, lo + chunk)
            re_ = tl.arange(0, E)
            o = tl.zeros((BM, BN), dtype=tl.float32)
            for p0 in tl.range(lo, hi, E, num_stages=3):
                p = p0 + re_
                pm = p < hi
                col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
                val = tl.load(val_ptr + p, mask=pm, other=0.0).to(xdt)
                xg = tl.load(x_rows + col[None, :], mask=mm[:, None] & pm[None, :],
                             other=0.0).to(xdt)
                hit = (p[:, None] >= rs[None, :]) & (p[:, None] < re[None, :])  # [E, BN]
                scat = tl.where(hit, val[:, None], tl.zeros((E, BN), dtype=xdt))
                o = tl.dot(xg, scat, o)
            if ALPHA_VEC:
                a = tl.load(a_ptr + rm, mask=mm, other=0.0).to(tl.float32)
                acc += a[:, None] * o
            else:
                acc += alpha * o
        tile = pid_n * tl.num_programs(0) + pid_m
        _finish(acc, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, mm, rn, mn, stride_ym, tile, pid_k,
                SPLIT, USE_SPLIT, HAS_BIAS, BM, BN)


def _named(fn, name: str):
    """``fn`` under another name: Triton names a compiled kernel after its function, and
    profiles should tell the two v1 kernels apart. The CPU interpreter re-executes the
    source and looks the function up by its name there, so it gets ``fn`` itself."""
    if interpret_mode():
        return fn
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    twin.__annotations__ = dict(fn.__annotations__)  # the tl.constexpr marks
    twin.__doc__ = fn.__doc__
    return twin


_gemm_kernel = triton.jit(_named(_v1_program, "_gemm_kernel"))
_gemv_kernel = triton.jit(do_not_specialize=["KW"])(_named(_v1_program, "_gemv_kernel"))
