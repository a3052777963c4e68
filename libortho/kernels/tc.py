"""Kernel v3 (``_tc_kernel``): tensor-core decode for 2–64 token rows on nibble-coded layers.

One program computes an output tile [BN rows of W, BM token rows] over one K split:

* **Weights as the MMA's M operand** (acc = W·Xᵀ, [BN, BM]): the tokens are the MMA's N
  dimension, padded to BM = 16 (tl.dot's minimum) for M < 16, so the weight tile (BN = 64 /
  128) fills the wgmma M dimension and the dequantised tile can stay an A operand in
  registers (Hopper's wgmma reads A from registers, B only from shared memory).
* **INT4 codes loaded as int32 word tiles [BN, BK/8]** (contiguous along K: 16-byte loads),
  staged by ``tl.range(num_stages=STAGES)`` (cp.async), dequantised in registers straight
  into the ``tl.dot`` operand. H2 (fp16 x, constant zero point, GPU only): inline PTX turns
  each word into 8 fp16 (c − z)·s with 1 SHF + 4 LOP3 + 4 HFMA2 + 4 HMUL2 (≈ 1.6
  instructions per weight; the v2 trick of gemv2.py plus one HMUL2 for the scale, applied to
  the exact (c − z)/16 so there is no cancellation). Else (bf16 x, asymmetric zeros, the
  interpreter) the fp32 "1 + c/16" path of codes.py.
* **Ortho stream inside the K loop**: the layout (layout.py) partitions each row's CSR
  entries by K block, so a split owns entries [kptr[b0, r], kptr[b1, r]) of row r. Those are
  walked EO per row per K iteration, spread over the loop so that their dependent loads
  (col/val, then the x gather) overlap the weight stream instead of trailing it; a tail loop
  after the K loop takes rows with more than (iterations × EO) entries in the split. The
  gathers accumulate into a separate fp32 [BN, BM] tensor in their own layout, added to the
  MMA accumulator once (one layout change per program, not per tile). XT: x is gathered from
  a transposed copy xt [K, M], so one (row, entry) pair reads BM contiguous token values
  (vector loads) instead of BM scalar loads on BM cache lines.
* **Low-rank part** (HAS_LR): t = X·Aᵀ [M, R] is one thin GEMM before the launch; B·t is
  fused as extra tl.dots (R in chunks of RB = 16, the chunks split round-robin over the K
  splits) into the same side accumulator, so alpha (scalar or per token row) multiplies
  S·x + B·(A·x) once.
* **Split-K** with the deterministic in-launch reduction of tile.py (``_finish``).

Operands (Marlin-style; every pointer is a device tensor):

* ``x`` fp16/bf16 [M, K] (row stride ``stride_xm``); ``xt`` the same values [K, M]
  contiguous (XT only, else any tensor).
* ``qw`` int32 [N, KW] (KW = K/8): ``qweight`` viewed as words, code j at bits 4j.
* ``s`` [N, G] fp16/bf16/fp32 scales, contiguous; ``z`` [N, G] zeros (read unless ZCONST;
  ZCONST: the constant ``zc``).
* ``bias`` [N] (HAS_BIAS); ``y`` [M, N] x.dtype (row stride ``stride_ym``).
* ``kptr`` int32 [NB + 1, N], ``col`` int16/int32 [nnz], ``val`` fp16/bf16 [nnz] (layout.py:
  columns sorted within rows); ``KB`` its K block, a divisor of KPS.
* ``a`` fp32 [M] per-row alpha (ALPHA_VEC) else the scalar ``alpha``.
* ``t`` [M, R] x.dtype = X·Aᵀ, ``lb`` [N, R] = B (ortho dtype) (HAS_LR).
* ``ws`` fp32 [tiles·SPLIT·BM·BN], ``cnt`` int32 counters: split-K (tile.py).
* ``onebits`` = 0x3F800000, ``zb0``/``zb1`` the half2 bit patterns of −(64 + zc/16) and
  −(4 + zc/16) (H2).
* ``KPS`` columns per split (a multiple of BK and of KB), ``SPLIT`` splits.
Constexprs: BM ∈ {16, 32, 64}, BN ≥ 16, BK (divides K; K tiles need no masks), GS group size,
EO ortho entries per row per K iteration, EVEN_M (M % BM == 0: no clamps on token rows).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .codes import _dequant_tile, _group_params
from .tile import _finish, _tile_ids


@triton.jit
def _h2_dequant8(q, s16, b0, b1):
    """One int32 word of 8 nibbles -> its 8 weights (c_i − z)·s as fp16, code order.

    As gemv2._h2_dequant: LOP3 puts nibble pairs under the fp16 exponent of 1024, one HFMA2
    gives the exact (c − z)/16 per pair; then one HMUL2 by 16·s (``s16``, fp16) rounds once.
    Pair registers hold (c_i, c_{i+4}), so the low halves are codes 0..3, the high 4..7.
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 q8, t0, t1, t2, t3, a0, a1, s2;
        mov.b32 s2, {$11, $11};
        shr.u32 q8, $8, 8;
        lop3.b32 t0, $8, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 t1, $8, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 t2, q8, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 t3, q8, 0x00F000F0, 0x64006400, 0xEA;
        mov.b32 a0, 0x2C002C00;
        mov.b32 a1, 0x1C001C00;
        fma.rn.f16x2 t0, t0, a0, $9;
        fma.rn.f16x2 t1, t1, a1, $10;
        fma.rn.f16x2 t2, t2, a0, $9;
        fma.rn.f16x2 t3, t3, a1, $10;
        mul.rn.f16x2 t0, t0, s2;
        mul.rn.f16x2 t1, t1, s2;
        mul.rn.f16x2 t2, t2, s2;
        mul.rn.f16x2 t3, t3, s2;
        mov.b32 {$0, $4}, t0;
        mov.b32 {$1, $5}, t1;
        mov.b32 {$2, $6}, t2;
        mov.b32 {$3, $7}, t3;
        }""",
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,h", args=[q, b0, b1, s16],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1)


@triton.jit
def _tc_weights(q, s_ptr, z_ptr, rnc, mn, k0, rw, G, zc, onebits, zb0, zb1, BN: tl.constexpr,
                BK: tl.constexpr, GS: tl.constexpr, ZCONST: tl.constexpr, H2: tl.constexpr,
                WDT: tl.constexpr):
    """Word tile q int32 [BN, BK/8] of columns [k0, k0 + BK) -> weights [BN, BK] in WDT,
    natural column order (8j + i = code i of word j)."""
    BKW: tl.constexpr = BK // 8
    if H2:
        if BK <= GS:  # one group per tile: one scale per row
            sc = tl.load(s_ptr + rnc * G + k0 // GS).to(tl.float32)[:, None]
        else:
            sc = tl.load(s_ptr + rnc[:, None] * G + (k0 + rw * 8)[None, :] // GS).to(tl.float32)
        w0, w1, w2, w3, w4, w5, w6, w7 = _h2_dequant8(q, (sc * 16.0).to(tl.float16), zb0, zb1)
        even = tl.join(tl.join(w0, w4), tl.join(w2, w6))  # see codes._dequant_tile
        odd = tl.join(tl.join(w1, w5), tl.join(w3, w7))
        return tl.reshape(tl.join(even, odd), (BN, BK))
    else:
        sa, sb = _group_params(s_ptr, z_ptr, rnc, mn, k0, rw, G, zc, 8, GS, BK, 4, ZCONST)
        return _dequant_tile(q, sa, sb, onebits, 4, BN, BKW, WDT)


@triton.jit
def _tc_gather(xg_ptr, stride_c, stride_m, rmx, col_ptr, val_ptr, p, pm):
    """Σ over the E entries p [BN, E, 1] (mask pm) of val·x[m, col] -> fp32 [BN, BM]: the
    shared helper for one chunk of CSR slices (in the K loop and in its tail). Everything is
    built in 3-D from the start, so the gathered [BN, E, BM] tile and the accumulator keep one
    layout (2-D col/val expanded to 3-D cost a shared-memory layout change per K tile in
    the SASS of Triton 3.6)."""
    col = tl.load(col_ptr + p, mask=pm, other=0).to(tl.int32)
    val = tl.load(val_ptr + p, mask=pm, other=0.0).to(tl.float32)
    xg = tl.load(xg_ptr + col * stride_c + rmx[None, None, :] * stride_m, mask=pm, other=0.0)
    return tl.sum(val * xg.to(tl.float32), axis=1)


@triton.jit
def _tc_kernel(x_ptr, xt_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, kptr_ptr, col_ptr, val_ptr, a_ptr,
               t_ptr, lb_ptr, y_ptr, ws_ptr, cnt_ptr, alpha, zc, onebits, zb0, zb1,
               M, N, KW, G, R, stride_xm, stride_ym, KPS, SPLIT, KB,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GS: tl.constexpr,
               ZCONST: tl.constexpr, H2: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_ORTHO: tl.constexpr, HAS_LR: tl.constexpr, ALPHA_VEC: tl.constexpr,
               EO: tl.constexpr, XT: tl.constexpr, EVEN_M: tl.constexpr,
               USE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr):
    """Y[M, N] = X·W_baseᵀ + alpha·(X·Sᵀ + (X·Aᵀ)·Bᵀ) (+ bias); operands in the module
    docstring. Grid (cdiv(M, BM), cdiv(N, BN), SPLIT); program (m, n, k) covers columns
    [k·KPS, min(K, (k+1)·KPS)). Rows past N re-read row N − 1 and token rows past M re-read
    row M − 1 (no load masks); neither is stored."""
    BKW: tl.constexpr = BK // 8
    K = KW * 8
    pid_m, pid_n, pid_k, rn, mn = _tile_ids(N, BN)
    rnc = tl.minimum(rn, N - 1)
    rm = pid_m * BM + tl.arange(0, BM)
    if EVEN_M:
        rmx = rm  # keeps the contiguity along m that vector loads of xt need
    else:
        rmx = tl.minimum(rm, M - 1)
    wdt = x_ptr.dtype.element_ty
    if DOT_F32:  # Triton 3.9's interpreter computes bf16 dots wrongly (kernel_notes.md)
        wdt = tl.float32
    rw = tl.arange(0, BKW)
    rk = tl.arange(0, BK)
    q_ptrs = qw_ptr + rnc[:, None] * KW + rw[None, :]
    if XT:  # x tile [BK, BM] and the gathers read xt [K, M]
        xk_ptrs = xt_ptr + rk[:, None] * M + rmx[None, :]
        xg_ptr = xt_ptr
        stride_c = M
        stride_m = 1
    else:
        xk_ptrs = x_ptr + rmx[None, :] * stride_xm + rk[:, None]
        xg_ptr = x_ptr
        stride_c = 1
        stride_m = stride_xm
    k_lo = pid_k * KPS
    k_hi = tl.minimum(K, k_lo + KPS)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if HAS_ORTHO:
        # this split's entries of each row: the K blocks [k_lo / KB, k_hi / KB) (KB | KPS)
        nbk = (K + KB - 1) // KB
        lo = tl.load(kptr_ptr + (k_lo // KB) * N + rnc)
        hi = tl.load(kptr_ptr + tl.minimum((k_lo + KPS) // KB, nbk) * N + rnc)
        hi = tl.where(mn, hi, lo)  # rows past N: empty
        o = tl.zeros((BN, BM), dtype=tl.float32)
        re = tl.arange(0, EO)[None, :, None]  # [1, EO, 1]
        lo3 = lo[:, None, None]
        hi3 = hi[:, None, None]
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        q = tl.load(q_ptrs + k0 // 8)
        w = _tc_weights(q, s_ptr, z_ptr, rnc, mn, k0, rw, G, zc, onebits, zb0, zb1, BN, BK,
                        GS, ZCONST, H2, wdt)
        xk = tl.load(xk_ptrs + k0 * stride_c).to(wdt)
        acc = tl.dot(w.to(wdt), xk, acc)
        if HAS_ORTHO:  # EO entries of each row per K iteration, beside the weight stream
            p = lo3 + ((k0 - k_lo) // BK) * EO + re
            o += _tc_gather(xg_ptr, stride_c, stride_m, rmx, col_ptr, val_ptr, p, p < hi3)
    if HAS_ORTHO or HAS_LR:
        side = tl.zeros((BN, BM), dtype=tl.float32)
        if HAS_ORTHO:  # tail: rows with more entries in this split than the loop took
            st = lo + ((k_hi - k_lo + BK - 1) // BK) * EO
            st3 = st[:, None, None]
            for j0 in range(0, tl.max(hi - st, axis=0), EO):
                p = st3 + j0 + re
                o += _tc_gather(xg_ptr, stride_c, stride_m, rmx, col_ptr, val_ptr, p, p < hi3)
            side += o
        if HAS_LR:  # B·t over this split's share of the rank, RB columns per dot
            RB: tl.constexpr = 16
            rr = tl.arange(0, RB)
            for r0 in range(pid_k * RB, R, SPLIT * RB):
                rmask = (r0 + rr) < R
                bt = tl.load(lb_ptr + rnc[:, None] * R + (r0 + rr)[None, :],
                             mask=rmask[None, :], other=0.0).to(wdt)
                tt = tl.load(t_ptr + rmx[None, :] * R + (r0 + rr)[:, None],
                             mask=rmask[:, None], other=0.0).to(wdt)
                side = tl.dot(bt, tt, side)
        if ALPHA_VEC:
            av = tl.load(a_ptr + rmx).to(tl.float32)
            acc += side * av[None, :]
        else:
            acc += side * alpha
    tile = pid_n * tl.num_programs(0) + pid_m
    _finish(tl.trans(acc), y_ptr, b_ptr, ws_ptr, cnt_ptr, rm, rm < M, rn, mn, stride_ym, tile,
            pid_k, SPLIT, USE_SPLIT, HAS_BIAS, BM, BN)
