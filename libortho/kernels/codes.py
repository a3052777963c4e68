"""Packed-code helpers shared by the Triton kernels: code extraction, folded group constants
and word-tile loads (layout of ``qw``/``s``/``z`` in libortho/kernels/triton_kernels.py)."""
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
def _load_words(q_ptrs, k0, mn, rw, KW, EPW: tl.constexpr, EVEN: tl.constexpr):
    """Word tile [BN, BKW] of columns [k0, k0 + BK) (masked to the matrix unless EVEN)."""
    kw0 = k0 // EPW
    if EVEN:
        return tl.load(q_ptrs + kw0)
    else:
        return tl.load(q_ptrs + kw0, mask=mn[:, None] & ((kw0 + rw) < KW)[None, :], other=0)



@triton.jit
def _x_halves(xp, XBF16: tl.constexpr):
    """int32 words holding two 16-bit x values (low, high) -> both as fp32 (same shape).
    bf16 is the top half of an fp32, so a shift or a mask replaces the conversion."""
    if XBF16:
        xa = (xp << 16).to(tl.float32, bitcast=True)
        xb = (xp & -65536).to(tl.float32, bitcast=True)
    else:
        xa = xp.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xb = (xp >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return xa, xb


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
