"""Triton kernels for Y = X·W_baseᵀ + alpha·X·W_orthoᵀ + bias (one launch per call).

Two kernels share the same operands, the same fused ortho stream and the same split-K
epilogue (one launch, partials reduced by the last program of each tile):

* ``_gemv_kernel`` — decode, 1–2 token rows per program. CUDA-core FMAs on the packed word
  tile in its load layout, one FFMA per weight.
* ``_gemm_kernel`` — several rows (decode batch ≥ 3, prefill). Dequantizes in the inner loop
  to the activation dtype and feeds ``tl.dot`` (fp32 accumulation).

Operands (all device tensors, see libortho/kernels/layout.py):

* ``qw``: int32 [N, KW] — the row-major packed codes of docs/DESIGN.md viewed as 32-bit
  words (little end first, so code j of a word sits at bits [j·CBITS, (j+1)·CBITS)).
* ``s``/``z``: [N, G] group scales / zeros (any float dtype; read as fp32). With ZCONST the
  zeros are the constant ``zconst`` (symmetric layers) and ``z`` is never read.
* ortho: CSR ``crow`` int32 [N+1], ``col`` int16/int32 [nnz], ``val`` fp16/bf16 [nnz].
  The entries are split evenly over the SPLIT programs of a tile, so the work stays
  balanced whatever the row lengths. Few token rows ("rows" mode, and the gemv kernel):
  each row's slice is gathered E entries per step. Many token rows ("tile" mode): the
  tile's slice is walked in chunks of E and scattered with a one-hot [E, BN] matrix
  through ``tl.dot``.
* alpha: scalar ``alpha`` or, with ALPHA_VEC, one fp32 value per token row at ``a_ptr``.
* split-K: ``ws`` fp32 workspace [tiles·SPLIT·BM·BN], ``cnt`` int32 counters (zero between
  launches), ``KPS`` columns per split (a multiple of BK).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _codes(q, i: tl.constexpr, onebits, CBITS: tl.constexpr):
    """Code i of every int32 word of ``q`` as fp32 f = 1 + c / 2^CBITS (exact; same layout).

    The code's bits are moved to the top of an fp32 mantissa under the exponent of 1.0
    (``onebits`` = 0x3F800000, a runtime value so that mask-and-or is one LOP3), so a shift
    and a LOP3 replace an int->float conversion (quarter rate on Hopper) and no subtraction
    is needed: callers fold c = 2^CBITS·(f − 1) into the group constants.
    """
    SH: tl.constexpr = 23 - CBITS - i * CBITS
    MASKC: tl.constexpr = ((1 << CBITS) - 1) << (23 - CBITS)
    if SH >= 0:
        t = q << SH
    else:
        t = q >> (-SH)
    return ((t & MASKC) | onebits).to(tl.float32, bitcast=True)


@triton.jit
def _group_params(s_ptr, z_ptr, rn, mn, k0, rw, G, zconst, EPW: tl.constexpr, GS: tl.constexpr,
                  BK: tl.constexpr, CBITS: tl.constexpr, ZCONST: tl.constexpr):
    """Folded group constants for the words of one K tile, fp32: (s·2^CBITS, s·(2^CBITS + z)),
    so that (c − z)·s = f·sa − sb with f from ``_codes``.

    BK <= GS: one group per tile -> [BN, 1]. BK > GS: per word -> [BN, BKW] (word j of the
    tile lies in group (k0 + EPW·j) // GS, since EPW divides GS).
    """
    ONE: tl.constexpr = float(1 << CBITS)
    if BK <= GS:
        off = rn * G + k0 // GS
        s = tl.load(s_ptr + off, mask=mn, other=0.0).to(tl.float32)[:, None]
        if ZCONST:
            z = zconst
        else:
            z = tl.load(z_ptr + off, mask=mn, other=0.0).to(tl.float32)[:, None]
    else:
        gi = (k0 + rw * EPW) // GS
        off = rn[:, None] * G + gi[None, :]
        msk = mn[:, None] & (gi < G)[None, :]
        s = tl.load(s_ptr + off, mask=msk, other=0.0).to(tl.float32)
        if ZCONST:
            z = zconst
        else:
            z = tl.load(z_ptr + off, mask=msk, other=0.0).to(tl.float32)
    return s * ONE, s * (z + ONE)


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
def _load_words(q_ptrs, k0, mn, rw, KW, EPW: tl.constexpr, EVEN: tl.constexpr):
    """Word tile [BN, BKW] of columns [k0, k0 + BK) (masked to the matrix unless EVEN)."""
    kw0 = k0 // EPW
    if EVEN:
        return tl.load(q_ptrs + kw0)
    else:
        return tl.load(q_ptrs + kw0, mask=mn[:, None] & ((kw0 + rw) < KW)[None, :], other=0)


@triton.jit
def _ortho_rows(x_rows, mm, rn, mn, crow_ptr, col_ptr, val_ptr, pid_k, SPLIT,
                BM: tl.constexpr, BN: tl.constexpr, E: tl.constexpr):
    """Ortho product [BM, BN] fp32 for few token rows: this split's slice of each output
    row's CSR entries, gathered E at a time as [BM, BN, E] (no one-hot scatter)."""
    rs = tl.load(crow_ptr + rn, mask=mn, other=0)
    re = tl.load(crow_ptr + rn + 1, mask=mn, other=0)
    chunk = (re - rs + SPLIT - 1) // SPLIT
    lo = rs + pid_k * chunk
    hi = tl.minimum(re, lo + chunk)
    longest = tl.max(hi - lo, axis=0)
    re_ = tl.arange(0, E)
    o = tl.zeros((BM, BN), dtype=tl.float32)
    for j0 in range(0, longest, E):
        p = lo[:, None] + j0 + re_[None, :]  # [BN, E]
        pm = p < hi[:, None]
        col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
        val = tl.load(val_ptr + p, mask=pm, other=0.0).to(tl.float32)
        xg = tl.load(x_rows[:, :, None] + col[None, :, :],
                     mask=mm[:, None, None] & pm[None, :, :], other=0.0).to(tl.float32)
        o += tl.sum(xg * val[None, :, :], axis=2)
    return o


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
def _fma_pair(q, i2: tl.constexpr, xp, p, xs, onebits, CBITS: tl.constexpr,
              XBF16: tl.constexpr):
    """p += f(code 2·i2)·x_lo + f(code 2·i2+1)·x_hi (two FFMAs); xs += x_lo + x_hi."""
    if XBF16:
        xa = (xp << 16).to(tl.float32, bitcast=True)
        xb = (xp & -65536).to(tl.float32, bitcast=True)
    else:
        xa = xp.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xb = (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    p += _codes(q, 2 * i2, onebits, CBITS) * xa[None, :]
    p += _codes(q, 2 * i2 + 1, onebits, CBITS) * xb[None, :]
    return p, xs + xa + xb


@triton.jit
def _store_out(acc, y_ptr, b_ptr, rm, mm, rn, mn, stride_ym, HAS_BIAS: tl.constexpr):
    """y[rm, rn] = acc (+ bias), cast to y's dtype, masked to the valid rows/columns."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _finish(acc, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, mm, rn, mn, stride_ym, tile, pid_k, SPLIT,
            USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr):
    """Write the [BM, BN] fp32 tile result; with split-K, reduce the SPLIT partials first.

    Split-K without extra launches: each program stores its partial in the fp32 workspace
    ``ws`` [tiles, SPLIT, BM, BN], then bumps the tile's counter (acq_rel, gpu scope). The
    program that sees SPLIT − 1 sums the partials (L2 loads), writes y and resets the counter
    to 0, so the counters are always zero between launches (and CUDA-graph replays).
    """
    if not USE_SPLIT:
        _store_out(acc, y_ptr, b_ptr, rm, mm, rn, mn, stride_ym, HAS_BIAS)
    else:
        loc = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        base = ws_ptr + tile * (SPLIT * BM * BN)
        tl.store(base + pid_k * (BM * BN) + loc, acc, cache_modifier=".cg")
        tl.debug_barrier()
        old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if old == SPLIT - 1:
            tot = tl.zeros((BM, BN), dtype=tl.float32)
            for sp in range(SPLIT):
                tot += tl.load(base + sp * (BM * BN) + loc, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
            _store_out(tot, y_ptr, b_ptr, rm, mm, rn, mn, stride_ym, HAS_BIAS)


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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    mn = rn < N
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
        rs = tl.load(crow_ptr + rn, mask=mn, other=0)
        re = tl.load(crow_ptr + rn + 1, mask=mn, other=0)
        chunk = (re - rs + SPLIT - 1) // SPLIT
        lo = rs + pid_k * chunk
        hi = tl.minimum(re, lo + chunk)
        longest = tl.max(hi - lo, axis=0)
        re_ = tl.arange(0, E)
        p = lo[:, None] + re_[None, :]  # [BN, E]
        pm = p < hi[:, None]
        val = tl.load(val_ptr + p, mask=pm, other=0.0).to(tl.float32)
        col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
        g0 = tl.load(x0_ptr + col, mask=pm, other=0.0)
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
            p0, xs0 = _fma_pair(q, 0, u0, p0, xs0, onebits, CBITS, XBF16)
            p0, xs0 = _fma_pair(q, 1, u1, p0, xs0, onebits, CBITS, XBF16)
            p0, xs0 = _fma_pair(q, 2, u2, p0, xs0, onebits, CBITS, XBF16)
            p0, xs0 = _fma_pair(q, 3, u3, p0, xs0, onebits, CBITS, XBF16)
            if BM == 2:
                v0, v1, v2, v3 = v0n, v1n, v2n, v3n
                v0n, v1n, v2n, v3n = _x_pairs4(x1_32, k1, rw, K, EVEN)
                p1, xs1 = _fma_pair(q, 0, v0, p1, xs1, onebits, CBITS, XBF16)
                p1, xs1 = _fma_pair(q, 1, v1, p1, xs1, onebits, CBITS, XBF16)
                p1, xs1 = _fma_pair(q, 2, v2, p1, xs1, onebits, CBITS, XBF16)
                p1, xs1 = _fma_pair(q, 3, v3, p1, xs1, onebits, CBITS, XBF16)
        else:
            for i in tl.static_range(EPW):
                kk = k0 + rw * EPW + i
                f = _codes(q, i, onebits, CBITS)
                if EVEN:
                    xv = tl.load(x0_ptr + kk).to(tl.float32)
                else:
                    xv = tl.load(x0_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
                p0 += f * xv[None, :]
                xs0 += xv
                if BM == 2:
                    if EVEN:
                        xv1 = tl.load(x1_ptr + kk).to(tl.float32)
                    else:
                        xv1 = tl.load(x1_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
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
            p = lo[:, None] + j0 + re_[None, :]
            pm = p < hi[:, None]
            col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
            val = tl.load(val_ptr + p, mask=pm, other=0.0).to(tl.float32)
            o0 += val * tl.load(x0_ptr + col, mask=pm, other=0.0).to(tl.float32)
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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    mn = rn < N
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
