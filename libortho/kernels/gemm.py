"""Tiled GEMM kernel (``_gemm_kernel``, tensor cores) for decode batches of 3 or more token
rows and prefill: dequantizes the word tile to the activation dtype inside the K loop and
feeds ``tl.dot``. Operands: see libortho/kernels/triton_kernels.py."""
from __future__ import annotations

import triton
import triton.language as tl

from .codes import _codes, _group_params
from .ortho import _ortho_rows
from .tile import _finish, _tile_ids


@triton.jit
def _dequant_tile(q, sa, sb, onebits, CBITS: tl.constexpr, BN: tl.constexpr,
                  BKW: tl.constexpr, DT: tl.constexpr):
    """Word tile q [BN, BKW] -> dequantized weights [BN, BKW·EPW] in natural column order,
    dtype DT (CBITS 4 or 8). The slots are joined in-register (join appends a last axis, so
    the outermost join picks the fastest index: slot s = 4·i2 + 2·i1 + i0 for nibbles)."""
    if CBITS == 4:
        w0 = (_codes(q, 0, onebits, CBITS) * sa - sb).to(DT)
        w1 = (_codes(q, 1, onebits, CBITS) * sa - sb).to(DT)
        w2 = (_codes(q, 2, onebits, CBITS) * sa - sb).to(DT)
        w3 = (_codes(q, 3, onebits, CBITS) * sa - sb).to(DT)
        w4 = (_codes(q, 4, onebits, CBITS) * sa - sb).to(DT)
        w5 = (_codes(q, 5, onebits, CBITS) * sa - sb).to(DT)
        w6 = (_codes(q, 6, onebits, CBITS) * sa - sb).to(DT)
        w7 = (_codes(q, 7, onebits, CBITS) * sa - sb).to(DT)
        even = tl.join(tl.join(w0, w4), tl.join(w2, w6))
        odd = tl.join(tl.join(w1, w5), tl.join(w3, w7))
        return tl.reshape(tl.join(even, odd), (BN, BKW * 8))
    else:
        w0 = (_codes(q, 0, onebits, CBITS) * sa - sb).to(DT)
        w1 = (_codes(q, 1, onebits, CBITS) * sa - sb).to(DT)
        w2 = (_codes(q, 2, onebits, CBITS) * sa - sb).to(DT)
        w3 = (_codes(q, 3, onebits, CBITS) * sa - sb).to(DT)
        return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BN, BKW * 4))


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, crow_ptr, col_ptr, val_ptr, a_ptr, y_ptr,
                 ws_ptr, cnt_ptr, alpha, zconst, onebits, M, N, K, KW, G, stride_xm, stride_ym,
                 KPS, SPLIT,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
                 CBITS: tl.constexpr, ZCONST: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_ORTHO: tl.constexpr, ALPHA_VEC: tl.constexpr, E: tl.constexpr,
                 USE_SPLIT: tl.constexpr, SWAP: tl.constexpr, JOIN: tl.constexpr,
                 EVEN: tl.constexpr, DOT_F32: tl.constexpr, ORTHO_ROWS: tl.constexpr):
    """Tiled GEMM kernel (tensor cores), decode batches ≥ 3 and prefill.

    Grid: (cdiv(M, BM), cdiv(N, BN), SPLIT); the M tiles of one N tile run back to back so
    each weight tile comes from HBM once. The K order inside a tile is free in a dot product,
    so code slot i of every word (columns k0 + EPW·j + i, j < BKW) is dequantized in the word
    tile's own layout, w = f·sa − sb, and multiplied with the matching strided slice of X:
    EPW dots of depth BKW ≥ 16 per tile. SWAP computes (W·Xᵀ)ᵀ so that the dequantized
    weights are the MMA's register operand (small BM). JOIN (4/8-bit) instead joins the slots
    in registers into a naturally ordered [BN, BK] tile: one dot per K tile, X contiguous.
    EVEN: N % BN == 0 and K % BK == 0 (no masks in the main loop).
    DOT_F32: upcast dot operands to fp32 (only for Triton's CPU interpreter, whose bf16 dot
    is wrong in Triton 3.9).
    Ortho (ORTHO_ROWS, few rows): each output row's entries split evenly over SPLIT and
    gathered as [BM, BN, E]. Otherwise the tile's CSR entries [crow[n0], crow[n0+BN]) are
    split evenly over SPLIT and walked in chunks of E: gathered X [BM, E] times a
    one-hot-scaled [E, BN] scatter matrix (tl.dot).
    """
    EPW: tl.constexpr = 32 // CBITS
    BKW: tl.constexpr = BK // EPW
    pid_m, pid_n, pid_k, rn, mn = _tile_ids(N, BN)
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

