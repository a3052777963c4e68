"""Triton kernels for Y = X·W_baseᵀ + alpha·X·W_orthoᵀ + bias (one launch per call).

Three kernels share the same operands, the same fused ortho stream and the same split-K
epilogue (one launch, partials reduced by the last program of each tile):

* ``_gemv2_kernel`` — decode v2 (the tuned default for 1–4 token rows on symmetric 4-bit
  layers): 16-byte word loads, fp16x2 dequantisation and dot products through inline PTX
  (≈ 2.8 instructions per weight), register or cp.async pipelining.
* ``_gemv_kernel`` — decode v1, 1–2 token rows per program (other layouts: asymmetric zeros,
  2/8-bit, K not a whole number of v2 tiles). CUDA-core FMAs on the packed word tile in its
  load layout, one FFMA per weight.
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


# ---------------------------------------------------------------------------------------------
# GEMV v2 (decode, 1–4 token rows): 16-byte word loads, fp16x2 dequantisation
# ---------------------------------------------------------------------------------------------

@triton.jit
def _h2_xpairs(u0, u1, u2, u3):
    """Raw x words (u_i = x[8j+2i] | x[8j+2i+1] << 16) -> half2 pairs (x_i, x_{i+4}), i < 4,
    the order in which ``_h2_dequant`` produces the codes of a word (one PRMT each)."""
    return tl.inline_asm_elementwise(
        asm="prmt.b32 $0, $4, $6, 0x5410; prmt.b32 $1, $4, $6, 0x7632; "
            "prmt.b32 $2, $5, $7, 0x5410; prmt.b32 $3, $5, $7, 0x7632;",
        constraints="=r,=r,=r,=r,r,r,r,r", args=[u0, u1, u2, u3],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _h2_dequant(q, b0, b1):
    """One int32 word of 8 nibbles -> 4 half2 registers ((c_i − z)/16, (c_{i+4} − z)/16).

    LOP3 puts nibble pairs (bits 0/16, 4/20 and, after one shift by 8, 8/24, 12/28) under the
    fp16 exponent of 1024 (0x6400): 1024 + c or 1024 + 16·c, both exact. One HFMA2 each
    scales and removes the offset and the zero point: (1024 + c)/16 − (64 + z/16) and
    (1024 + 16c)/256 − (4 + z/16); every intermediate is exact in fp16. b0, b1 are the
    half2 bit patterns of −(64 + z/16) and −(4 + z/16).
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 q8, t0, t1, t2, t3, a0, a1;
        shr.u32 q8, $4, 8;
        lop3.b32 t0, $4, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 t1, $4, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 t2, q8, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 t3, q8, 0x00F000F0, 0x64006400, 0xEA;
        mov.b32 a0, 0x2C002C00;
        mov.b32 a1, 0x1C001C00;
        fma.rn.f16x2 $0, t0, a0, $5;
        fma.rn.f16x2 $1, t1, a1, $6;
        fma.rn.f16x2 $2, t2, a0, $5;
        fma.rn.f16x2 $3, t3, a1, $6;
        }""",
        constraints="=r,=r,=r,=r,r,r,r", args=[q, b0, b1],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _h2_dot(w0, w1, w2, w3, x0, x1, x2, x3):
    """Σ over the 8 codes of a word of ((c − z)/16)·x: 4 HFMA2 in fp16 (|x| < 32752 keeps the
    chain finite: |(c − z)/16| ≤ 1/2, 4 steps), then the two halves summed in fp32."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 h;
        .reg .b16 lo, hi;
        .reg .f32 fl, fh;
        mul.rn.f16x2 h, $1, $5;
        fma.rn.f16x2 h, $2, $6, h;
        fma.rn.f16x2 h, $3, $7, h;
        fma.rn.f16x2 h, $4, $8, h;
        mov.b32 {lo, hi}, h;
        cvt.f32.f16 fl, lo;
        cvt.f32.f16 fh, hi;
        add.f32 $0, fl, fh;
        }""",
        constraints="=r,r,r,r,r,r,r,r,r", args=[w0, w1, w2, w3, x0, x1, x2, x3],
        dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _ld_f16_asm(ptrs):
    """fp16 load through inline PTX (ld.global.nc): unlike tl.load it is no layout anchor, so
    the group scales take the word tile's layout instead of forcing the accumulator into
    theirs (which costs a shared-memory layout change per tile)."""
    return tl.inline_asm_elementwise(
        asm="ld.global.nc.b16 $0, [$1];", constraints="=h,l", args=[ptrs.to(tl.int64)],
        dtype=tl.float16, is_pure=True, pack=1)


@triton.jit
def _v2_xwords(xw_ptr, wofs, kw, XVEC: tl.constexpr):
    """x words of one K tile for one token row: four int32 [GPT, WPG] tensors u_i (see
    ``_h2_xpairs``). XVEC: one 16-byte ld.global.nc.v4 per word through inline PTX (no
    layout anchor, no split of a loaded vector, not staged by the pipeliner); else four
    4-byte tl.loads per word (also the interpreter path)."""
    p = xw_ptr + (kw + wofs) * 4
    if XVEC:
        u0, u1, u2, u3 = tl.inline_asm_elementwise(
            asm="ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", constraints="=r,=r,=r,=r,l",
            args=[p.to(tl.int64)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    else:
        u0 = tl.load(p)
        u1 = tl.load(p + 1)
        u2 = tl.load(p + 2)
        u3 = tl.load(p + 3)
    return u0, u1, u2, u3


@triton.jit
def _v2_row(q, w0, w1, w2, w3, u0, u1, u2, u3, sa, sb, acc, onebits, H2: tl.constexpr,
            XBF16: tl.constexpr):
    """acc [BN, GPT, WPG] += one token row's per-word partial dot products with the word
    tile q (fp32). H2: w_i from ``_h2_dequant`` (shared by all rows), sa = 16·s.
    Else fp32 FMAs on f = 1 + c/16 (``_codes``): sa = 16·s, sb = s·(16 + z)."""
    if H2:
        x0, x1, x2, x3 = _h2_xpairs(u0, u1, u2, u3)
        p = _h2_dot(w0, w1, w2, w3, x0[None], x1[None], x2[None], x3[None])
        acc += p * sa
    else:
        p = tl.zeros(acc.shape, dtype=tl.float32)
        xs = tl.zeros(u0.shape, dtype=tl.float32)
        uu = u0
        for i2 in tl.static_range(4):
            if i2 == 1:
                uu = u1
            if i2 == 2:
                uu = u2
            if i2 == 3:
                uu = u3
            if XBF16:
                xa = (uu << 16).to(tl.float32, bitcast=True)
                xb = (uu & -65536).to(tl.float32, bitcast=True)
            else:
                xa = uu.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                xb = (uu >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            p += _codes(q, 2 * i2, onebits, 4) * xa[None]
            p += _codes(q, 2 * i2 + 1, onebits, 4) * xb[None]
            xs += xa + xb
        acc += sa * p - sb * xs[None]
    return acc


@triton.jit
def _gemv2_kernel(x_ptr, qw_ptr, s_ptr, b_ptr, crow_ptr, col_ptr, val_ptr, a_ptr, y_ptr,
                  ws_ptr, cnt_ptr, alpha, onebits, zb0, zb1, zc, M, N, KW, G, stride_xm,
                  stride_ym, KPSW, SPLIT,
                  BM: tl.constexpr, BN: tl.constexpr, GPT: tl.constexpr, GS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_ORTHO: tl.constexpr, ALPHA_VEC: tl.constexpr,
                  E: tl.constexpr, USE_SPLIT: tl.constexpr, H2: tl.constexpr,
                  XBF16: tl.constexpr, XVEC: tl.constexpr, SBC: tl.constexpr,
                  STAGES: tl.constexpr, OPF: tl.constexpr):
    """Decode kernel v2: BM ≤ 4 token rows, 4-bit codes in nibbles, constant zero point zc.

    Grid (cdiv(M, BM), cdiv(N, BN), SPLIT); program (m, n, k) covers words
    [k·KPSW, (k+1)·KPSW) of BN rows (KPSW and KW multiples of the tile's BKW = GPT·GS/8
    words, so there are no K masks). The word tile is [BN, GPT, WPG] (WPG = GS/8 words per
    group): contiguous along its last two axes, so each thread reads 16-byte vectors, and one
    scale per (row, group) broadcasts over the group's words. The tile of the next iteration
    (words, scales, x words) is loaded before this one is computed. Each token row has its
    own accumulator in the word tile's layout (no 4-D tensors: they cost a layout change
    through shared memory per tile), so the dequantised tile is shared by the BM rows.
    H2 (fp16 x): codes become half2 (c − z)/16 with LOP3 + HFMA2 (``_h2_dequant``), each word
    is 4 HFMA2 against half2 x pairs, then one fp32 add and one fp32 FMA with the scale
    (≈ 2.1 instructions per weight at BM = 1 instead of ≈ 4.2). Else fp32 FMAs as in
    ``_gemv_kernel``. Rows past M re-read row M−1 and are never stored; rows past N re-read
    row N−1 and are never stored.
    Ortho stream as in ``_ortho_rows`` (this split's slice of each row), after the K loop;
    OPF (BM = 1): the first E entries of each row slice (crow, col, val and the x gather)
    are loaded before the K loop so that their dependent round trips overlap it.
    """
    WPG: tl.constexpr = GS // 8
    BKW: tl.constexpr = GPT * WPG
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    mn = rn < N
    rnc = tl.minimum(rn, N - 1)  # no load masks
    rg = tl.arange(0, GPT)
    wofs = rg[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [GPT, WPG]
    q_ptrs = qw_ptr + rnc[:, None, None] * KW + wofs[None, :, :]
    s_ptrs = s_ptr + rnc[:, None, None] * G + rg[None, :, None]  # [BN, GPT, 1]
    m0 = pid_m * BM
    x32 = x_ptr.to(tl.pointer_type(tl.int32))
    xs2 = stride_xm // 2
    xw0 = x32 + tl.minimum(m0, M - 1) * xs2
    xw1 = x32 + tl.minimum(m0 + 1, M - 1) * xs2
    xw2 = x32 + tl.minimum(m0 + 2, M - 1) * xs2
    xw3 = x32 + tl.minimum(m0 + 3, M - 1) * xs2
    kw_lo = pid_k * KPSW
    kw_hi = tl.minimum(KW, kw_lo + KPSW)
    kw_last = kw_hi - BKW
    acc0 = tl.zeros((BN, GPT, WPG), dtype=tl.float32)
    acc1 = tl.zeros((BN, GPT, WPG), dtype=tl.float32)
    acc2 = tl.zeros((BN, GPT, WPG), dtype=tl.float32)
    acc3 = tl.zeros((BN, GPT, WPG), dtype=tl.float32)
    if HAS_ORTHO and OPF:  # BM = 1: issue the ortho chain (crow -> col/val -> x) before
        x0_ptr = x_ptr + tl.minimum(m0, M - 1) * stride_xm  # the K loop, reduce it after
        rs = tl.load(crow_ptr + rn, mask=mn, other=0)
        re = tl.load(crow_ptr + rn + 1, mask=mn, other=0)
        chunk = (re - rs + SPLIT - 1) // SPLIT
        lo = rs + pid_k * chunk
        hi = tl.minimum(re, lo + chunk)
        re_ = tl.arange(0, E)
        op = lo[:, None] + re_[None, :]  # [BN, E]
        opm = op < hi[:, None]
        oval = tl.load(val_ptr + op, mask=opm, other=0.0).to(tl.float32)
        ocol = tl.load(col_ptr + op, mask=opm, other=0).to(tl.int32)
        og0 = tl.load(x0_ptr + ocol, mask=opm, other=0.0)
    if STAGES > 1:  # Triton's cp.async pipeline (16-byte copies) through shared memory
        # (the scales are prefetched by hand one tile ahead through inline PTX: a tl.load of
        # them would become the layout anchor of the accumulators)
        if SBC:
            s_n = _ld_f16_asm(s_ptrs + kw_lo // WPG).to(tl.float32)
        else:
            s_n = tl.load(s_ptrs + kw_lo // WPG).to(tl.float32)
        for kw in tl.range(kw_lo, kw_hi, BKW, num_stages=STAGES):
            q = tl.load(q_ptrs + kw)
            sc = s_n
            k1 = tl.minimum(kw + BKW, kw_last)
            if SBC:
                s_n = _ld_f16_asm(s_ptrs + k1 // WPG).to(tl.float32)
            else:
                s_n = tl.load(s_ptrs + k1 // WPG).to(tl.float32)
            sa = sc * 16.0
            sb = sc * (16.0 + zc)
            if H2:
                w0, w1, w2, w3 = _h2_dequant(q, zb0, zb1)
            else:
                w0, w1, w2, w3 = q, q, q, q
            a0, a1, a2, a3 = _v2_xwords(xw0, wofs, kw, XVEC)
            acc0 = _v2_row(q, w0, w1, w2, w3, a0, a1, a2, a3, sa, sb, acc0, onebits, H2, XBF16)
            if BM >= 2:
                b0, b1, b2, b3 = _v2_xwords(xw1, wofs, kw, XVEC)
                acc1 = _v2_row(q, w0, w1, w2, w3, b0, b1, b2, b3, sa, sb, acc1, onebits, H2,
                               XBF16)
            if BM >= 4:
                c0, c1, c2, c3 = _v2_xwords(xw2, wofs, kw, XVEC)
                acc2 = _v2_row(q, w0, w1, w2, w3, c0, c1, c2, c3, sa, sb, acc2, onebits, H2,
                               XBF16)
                d0, d1, d2, d3 = _v2_xwords(xw3, wofs, kw, XVEC)
                acc3 = _v2_row(q, w0, w1, w2, w3, d0, d1, d2, d3, sa, sb, acc3, onebits, H2,
                               XBF16)
    else:  # software pipelining by hand: the next tile is loaded into registers first
        q_n = tl.load(q_ptrs + kw_lo)
        if SBC:
            s_n = _ld_f16_asm(s_ptrs + kw_lo // WPG).to(tl.float32)
        else:
            s_n = tl.load(s_ptrs + kw_lo // WPG).to(tl.float32)
        a0n, a1n, a2n, a3n = _v2_xwords(xw0, wofs, kw_lo, XVEC)
        if BM >= 2:
            b0n, b1n, b2n, b3n = _v2_xwords(xw1, wofs, kw_lo, XVEC)
        if BM >= 4:
            c0n, c1n, c2n, c3n = _v2_xwords(xw2, wofs, kw_lo, XVEC)
            d0n, d1n, d2n, d3n = _v2_xwords(xw3, wofs, kw_lo, XVEC)
        for kw in range(kw_lo, kw_hi, BKW):
            q = q_n
            sc = s_n
            a0, a1, a2, a3 = a0n, a1n, a2n, a3n
            k1 = tl.minimum(kw + BKW, kw_last)  # after the last tile: harmless re-read
            q_n = tl.load(q_ptrs + k1)
            if SBC:
                s_n = _ld_f16_asm(s_ptrs + k1 // WPG).to(tl.float32)
            else:
                s_n = tl.load(s_ptrs + k1 // WPG).to(tl.float32)
            a0n, a1n, a2n, a3n = _v2_xwords(xw0, wofs, k1, XVEC)
            if BM >= 2:
                b0, b1, b2, b3 = b0n, b1n, b2n, b3n
                b0n, b1n, b2n, b3n = _v2_xwords(xw1, wofs, k1, XVEC)
            if BM >= 4:
                c0, c1, c2, c3 = c0n, c1n, c2n, c3n
                d0, d1, d2, d3 = d0n, d1n, d2n, d3n
                c0n, c1n, c2n, c3n = _v2_xwords(xw2, wofs, k1, XVEC)
                d0n, d1n, d2n, d3n = _v2_xwords(xw3, wofs, k1, XVEC)
            sa = sc * 16.0
            sb = sc * (16.0 + zc)
            if H2:
                w0, w1, w2, w3 = _h2_dequant(q, zb0, zb1)
            else:
                w0, w1, w2, w3 = q, q, q, q
            acc0 = _v2_row(q, w0, w1, w2, w3, a0, a1, a2, a3, sa, sb, acc0, onebits, H2,
                           XBF16)
            if BM >= 2:
                acc1 = _v2_row(q, w0, w1, w2, w3, b0, b1, b2, b3, sa, sb, acc1, onebits, H2,
                               XBF16)
            if BM >= 4:
                acc2 = _v2_row(q, w0, w1, w2, w3, c0, c1, c2, c3, sa, sb, acc2, onebits, H2,
                               XBF16)
                acc3 = _v2_row(q, w0, w1, w2, w3, d0, d1, d2, d3, sa, sb, acc3, onebits, H2,
                               XBF16)
    y0 = tl.sum(tl.sum(acc0, axis=2), axis=1)  # [BN]
    if BM == 1:
        y = y0[None, :]
    elif BM == 2:
        y1 = tl.sum(tl.sum(acc1, axis=2), axis=1)
        y = tl.trans(tl.join(y0, y1))
    else:
        y1 = tl.sum(tl.sum(acc1, axis=2), axis=1)
        y2 = tl.sum(tl.sum(acc2, axis=2), axis=1)
        y3 = tl.sum(tl.sum(acc3, axis=2), axis=1)
        # [BN, i, j] = y_{2i+j} -> [i, j, BN] -> [4, BN]
        y = tl.reshape(tl.permute(tl.join(tl.join(y0, y2), tl.join(y1, y3)), (1, 2, 0)),
                       (4, BN))
    rm = m0 + tl.arange(0, BM)
    rmc = tl.minimum(rm, M - 1)
    if HAS_ORTHO and OPF:
        o0 = oval * og0.to(tl.float32)
        longest = tl.max(hi - lo, axis=0)
        for j0 in range(E, longest, E):  # rows longer than E entries in this slice
            op = lo[:, None] + j0 + re_[None, :]
            opm = op < hi[:, None]
            ocol = tl.load(col_ptr + op, mask=opm, other=0).to(tl.int32)
            oval = tl.load(val_ptr + op, mask=opm, other=0.0).to(tl.float32)
            o0 += oval * tl.load(x0_ptr + ocol, mask=opm, other=0.0).to(tl.float32)
        o = tl.sum(o0, axis=1)[None, :]
        if ALPHA_VEC:
            y += tl.load(a_ptr + rmc).to(tl.float32)[:, None] * o
        else:
            y += alpha * o
    elif HAS_ORTHO:
        x_rows = x_ptr + rmc[:, None] * stride_xm
        o = _ortho_rows(x_rows, rm < M, rn, mn, crow_ptr, col_ptr, val_ptr, pid_k, SPLIT,
                        BM, BN, E)
        if ALPHA_VEC:
            a = tl.load(a_ptr + rmc).to(tl.float32)
            y += a[:, None] * o
        else:
            y += alpha * o
    tile = pid_n * tl.num_programs(0) + pid_m
    _finish(y, y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rm < M, rn, mn, stride_ym, tile, pid_k,
            SPLIT, USE_SPLIT, HAS_BIAS, BM, BN)
