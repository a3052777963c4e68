"""Decode kernel v2 (``_gemv2_kernel``): 1–4 token rows on symmetric 4-bit layers, the tuned
default for decode. 16-byte word loads, fp16x2 dequantisation and dot products through inline
PTX (about 2.8 instructions per weight), register or cp.async pipelining. Operands: see
libortho/kernels/triton_kernels.py.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codes import _codes, _x_halves
from .ortho import _csr_gather, _csr_slice, _ortho_rows
from .tile import _finish, _tile_ids


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
def _v2_scales(s_ptrs, kw, WPG: tl.constexpr, SBC: tl.constexpr):
    """fp32 scales [BN, GPT, 1] of the K tile at word kw; SBC: through ``_ld_f16_asm``."""
    if SBC:
        return _ld_f16_asm(s_ptrs + kw // WPG).to(tl.float32)
    else:
        return tl.load(s_ptrs + kw // WPG).to(tl.float32)


@triton.jit
def _v2_dequant(q, sc, zc, zb0, zb1, H2: tl.constexpr):
    """Per-tile operands of ``_v2_row``: sa = 16·s, sb = s·(16 + zc) and, with H2, the half2
    codes of q (``_h2_dequant``, shared by all token rows); else q stands in for them."""
    sa = sc * 16.0
    sb = sc * (16.0 + zc)
    if H2:
        w0, w1, w2, w3 = _h2_dequant(q, zb0, zb1)
    else:
        w0, w1, w2, w3 = q, q, q, q
    return sa, sb, w0, w1, w2, w3

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
            xa, xb = _x_halves(uu, XBF16)
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
    pid_m, pid_n, pid_k, rn, mn = _tile_ids(N, BN)
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
        lo, hi = _csr_slice(crow_ptr, rn, mn, pid_k, SPLIT)
        ocol, oval, opm, og0 = _csr_gather(x0_ptr, mn, col_ptr, val_ptr, lo, hi, 0, E, False,
                                           VAL_FIRST=True)
    if STAGES > 1:  # Triton's cp.async pipeline (16-byte copies) through shared memory
        # (the scales are prefetched by hand one tile ahead through inline PTX: a tl.load of
        # them would become the layout anchor of the accumulators)
        s_n = _v2_scales(s_ptrs, kw_lo, WPG, SBC)
        for kw in tl.range(kw_lo, kw_hi, BKW, num_stages=STAGES):
            q = tl.load(q_ptrs + kw)
            sc = s_n
            k1 = tl.minimum(kw + BKW, kw_last)
            s_n = _v2_scales(s_ptrs, k1, WPG, SBC)
            sa, sb, w0, w1, w2, w3 = _v2_dequant(q, sc, zc, zb0, zb1, H2)
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
        s_n = _v2_scales(s_ptrs, kw_lo, WPG, SBC)
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
            s_n = _v2_scales(s_ptrs, k1, WPG, SBC)
            a0n, a1n, a2n, a3n = _v2_xwords(xw0, wofs, k1, XVEC)
            if BM >= 2:
                b0, b1, b2, b3 = b0n, b1n, b2n, b3n
                b0n, b1n, b2n, b3n = _v2_xwords(xw1, wofs, k1, XVEC)
            if BM >= 4:
                c0, c1, c2, c3 = c0n, c1n, c2n, c3n
                d0, d1, d2, d3 = d0n, d1n, d2n, d3n
                c0n, c1n, c2n, c3n = _v2_xwords(xw2, wofs, k1, XVEC)
                d0n, d1n, d2n, d3n = _v2_xwords(xw3, wofs, k1, XVEC)
            sa, sb, w0, w1, w2, w3 = _v2_dequant(q, sc, zc, zb0, zb1, H2)
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
            ocol, oval, opm, og = _csr_gather(x0_ptr, mn, col_ptr, val_ptr, lo, hi, j0, E,
                                              False)
            o0 += oval * og.to(tl.float32)
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
