"""The fp16 (H2) dequantisation of kernel v3 and of the v2 decode kernel, checked on the CPU.

Triton's interpreter cannot run inline PTX (``create_inline_asm`` raises NotImplementedError
in Triton 3.9), so the interpreter tests (tests/test_kernels.py) only reach the fp32 path of
these kernels. Here the PTX text itself is executed: the asm strings of ``tc._h2_dequant8``
and ``gemv2._h2_dequant`` are read from the kernel sources and run by a small interpreter of
the few instructions they use, in exact fp16 arithmetic (numpy: fp16 operands, the exact
result in fp64, one rounding to fp16, as ``.rn`` does). Checked:

* every code 0..15 with the zero points the kernels take (8: 4-bit symmetric, 4: 3-bit in
  nibbles, 0 and 15: the range ends): ``(c − z)/16`` exact, then ``(c − z)·s`` rounded once;
* the H2 branch of ``tc._tc_weights`` (its source run on numpy arrays with a stand-in for
  the few ``tl`` calls it makes: the scale loaded as fp32, × 16 → fp16, the joins that put
  the 8 outputs of a word in natural column order, one scale per row per K tile or per
  word) against the reference dequantisation of a random layer, bitwise after rounding the
  reference to fp16;
* the half2 constants ``dispatch._half2_bits`` passes.

Both the asm and the branch are the kernel's own text: a change to either that alters the
arithmetic or the column order fails here (the stand-ins for tl.load / tl.join / tl.reshape
and the PTX instructions are the modelled part). What stays GPU-only: register allocation, the tl.dot operand
layout and everything else the compiler does (tests/gpu/test_kernels_gpu.py).
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from libortho.kernels.dispatch import _half2_bits
from libortho.kernels.layout import build_layout
from libortho.kernels.reference import dequantize
from libortho.kernels.synthetic import random_layer

KDIR = os.path.join(os.path.dirname(__file__), "..", "libortho", "kernels")


def _asm_of(module_file: str, func: str):
    """(asm text, constraint list) of the one inline_asm_elementwise in ``func``."""
    with open(os.path.join(KDIR, module_file)) as f:
        src = f.read()
    body = src[src.index(f"def {func}("):]
    body = body[:body.index("\n@triton.jit") if "\n@triton.jit" in body else len(body)]
    asm = re.search(r'asm="""(.*?)"""', body, re.S).group(1)
    cons = re.search(r'constraints="([^"]*)"', body).group(1).split(",")
    return asm, cons


def _split_operands(text: str):
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    out.append(cur.strip())
    return out


def _halves(v):
    lo = (v & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = ((v >> 16) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def _pack(lo, hi):
    lo16 = lo.astype(np.float16).view(np.uint16).astype(np.uint64)
    hi16 = hi.astype(np.float16).view(np.uint16).astype(np.uint64)
    return lo16 | (hi16 << np.uint64(16))


def run_ptx(asm: str, constraints, args):
    """Execute ``asm`` on numpy arrays. args: the inputs in constraint order (uint32 words for
    "r", uint16 fp16 bit patterns for "h"); returns the outputs ("=r" / "=h") as uint64
    arrays of their bit patterns. Only the instructions the dequantisation uses are known;
    any other fails the test (so a changed asm is noticed)."""
    n_out = sum(c.startswith("=") for c in constraints)
    regs = {f"${n_out + i}": np.asarray(a, dtype=np.uint64) for i, a in enumerate(args)}
    mask32 = np.uint64(0xFFFFFFFF)

    def val(tok):
        tok = tok.strip()
        if tok.startswith("{"):
            lo, hi = (val(t) for t in _split_operands(tok[1:-1]))
            return (lo & np.uint64(0xFFFF)) | ((hi & np.uint64(0xFFFF)) << np.uint64(16))
        if tok in regs:
            return regs[tok]
        return np.uint64(int(tok, 0))

    body = asm.strip()
    body = body[1:-1] if body.startswith("{") else body
    for stmt in body.split(";"):
        stmt = " ".join(stmt.split())
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(" ", 1)
        ops = _split_operands(rest)
        if op == "mov.b32" and ops[0].startswith("{"):  # unpack a b32 into two b16
            v = val(ops[1])
            lo, hi = _split_operands(ops[0][1:-1])
            regs[lo], regs[hi] = v & np.uint64(0xFFFF), (v >> np.uint64(16)) & np.uint64(0xFFFF)
        elif op == "mov.b32":
            regs[ops[0]] = val(ops[1]) & mask32
        elif op == "shr.u32":
            regs[ops[0]] = (val(ops[1]) & mask32) >> val(ops[2])
        elif op == "lop3.b32":  # immLut bit (a·4 + b·2 + c) of each bit triple
            a, b, c, lut = (val(t) for t in ops[1:5])
            r = np.uint64(0)
            for i in range(8):
                if int(lut) >> i & 1:
                    ta = a if i & 4 else ~a
                    tb = b if i & 2 else ~b
                    tc = c if i & 1 else ~c
                    r = r | (ta & tb & tc)
            regs[ops[0]] = r & mask32
        elif op in ("fma.rn.f16x2", "mul.rn.f16x2"):
            a, b = _halves(val(ops[1])), _halves(val(ops[2]))
            c = _halves(val(ops[3])) if op.startswith("fma") else (0.0, 0.0)
            regs[ops[0]] = _pack(a[0] * b[0] + c[0], a[1] * b[1] + c[1])
        else:
            raise AssertionError(f"instruction not modelled: {stmt}")
    return [regs[f"${i}"] for i in range(n_out)]


def _words(codes: np.ndarray) -> np.ndarray:
    """codes [..., 8] in 0..15 -> int32 words (code i at bits 4i) as uint64."""
    w = np.zeros(codes.shape[:-1], dtype=np.uint64)
    for i in range(8):
        w |= codes[..., i].astype(np.uint64) << np.uint64(4 * i)
    return w


def _zb(z: float):
    return (np.uint64(_half2_bits(-(64.0 + z / 16.0)) & 0xFFFFFFFF),
            np.uint64(_half2_bits(-(4.0 + z / 16.0)) & 0xFFFFFFFF))


def _f16(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint64).astype(np.uint16).view(np.float16)


def test_half2_constants():
    for z in (0.0, 4.0, 8.0, 15.0):
        b0, b1 = _zb(z)
        lo, hi = _halves(b0)
        assert lo == hi == -(64.0 + z / 16.0)
        lo, hi = _halves(b1)
        assert lo == hi == -(4.0 + z / 16.0)


@pytest.mark.parametrize("z", [8.0, 4.0, 0.0, 15.0])
def test_tc_h2_dequant8_is_one_rounding_of_the_exact_product(z):
    asm, cons = _asm_of("tc.py", "_h2_dequant8")
    assert cons == ["=h"] * 8 + ["r", "r", "r", "h"]
    rng = np.random.default_rng(int(z))
    codes = np.stack([np.arange(16)] * 8, -1)  # every code in every slot
    codes = np.concatenate([codes, rng.integers(0, 16, (4096, 8))])
    # fp16 scales over the whole range 16·s stays finite for: subnormal to 2^11
    s = np.concatenate([np.float16(2.0) ** np.arange(-24, 12, dtype=np.float64),
                        rng.uniform(1e-4, 0.1, codes.shape[0] - 36)]).astype(np.float16)
    s16 = (s.astype(np.float32) * np.float32(16.0)).astype(np.float16)  # as _tc_weights
    assert np.all(s16.astype(np.float64) == 16.0 * s.astype(np.float64))  # exact
    b0, b1 = _zb(z)
    outs = run_ptx(asm, cons, [_words(codes), np.full(codes.shape[0], b0),
                               np.full(codes.shape[0], b1), s16.view(np.uint16)])
    got = np.stack([_f16(o) for o in outs], -1)  # [rows, 8], code order
    want = ((codes - z) * s.astype(np.float64)[:, None]).astype(np.float16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("z", [8.0, 4.0, 0.0, 15.0])
def test_v2_h2_dequant_is_exact(z):
    asm, cons = _asm_of("gemv2.py", "_h2_dequant")
    rng = np.random.default_rng(100 + int(z))
    codes = np.concatenate([np.stack([np.arange(16)] * 8, -1), rng.integers(0, 16, (512, 8))])
    b0, b1 = _zb(z)
    outs = run_ptx(asm, cons, [_words(codes), np.full(codes.shape[0], b0),
                               np.full(codes.shape[0], b1)])
    for i, o in enumerate(outs):  # register i holds the pair (c_i, c_{i+4}), each (c − z)/16
        lo, hi = _halves(o)
        assert np.array_equal(lo, (codes[:, i] - z) / 16.0)
        assert np.array_equal(hi, (codes[:, i + 4] - z) / 16.0)


class _T(np.ndarray):
    """numpy array with Triton's ``.to(dtype)``, for running kernel source on the CPU."""

    def to(self, dtype):
        return self.astype(dtype).view(_T)


class _TL:
    """The few ``tl`` names the H2 branch of ``tc._tc_weights`` uses, on numpy arrays."""
    float16, float32 = np.float16, np.float32

    def __init__(self, flat_scales: np.ndarray):
        self._s = flat_scales

    def load(self, offsets):  # s_ptr is 0: the offsets index the flat scales
        return self._s[np.asarray(offsets)].view(_T)

    @staticmethod
    def join(a, b):  # tl.join appends a last axis of size 2
        return np.stack([a, b], -1).view(_T)

    @staticmethod
    def reshape(x, shape):
        return np.reshape(x, shape)


def _h2_branch_of_tc_weights():
    """The ``if H2:`` branch of ``tc._tc_weights``, taken from the kernel source and compiled
    as a plain Python function of the same names (tl, _h2_dequant8 passed in)."""
    with open(os.path.join(KDIR, "tc.py")) as f:
        src = f.read()
    body = src[src.index("def _tc_weights("):]
    start = body.index("\n    if H2:\n") + len("\n    if H2:\n")
    branch = body[start:body.index("\n    else:\n", start)]  # the else at the if's indent
    lines = [ln[4:] for ln in branch.splitlines()]  # dedent from the if to the def level
    code = ("def branch(q, s_ptr, rnc, k0, rw, G, zb0, zb1, BN, BK, GS, tl, _h2_dequant8):\n"
            + "\n".join(lines) + "\n")
    ns: dict = {}
    exec(compile(code, "tc.py:_tc_weights[H2]", "exec"), ns)
    return ns["branch"]


def _tc_weights_h2(qw: np.ndarray, scales: np.ndarray, zc: float, k0: int, bk: int, gs: int):
    """tc._tc_weights' H2 branch (its own source) for one K tile: words qw [N, BK/8] of
    columns [k0, k0 + BK) -> fp16 weights [N, BK], natural column order."""
    asm, cons = _asm_of("tc.py", "_h2_dequant8")
    n, bkw = qw.shape

    def dequant8(q, s16, b0, b1):
        s16 = np.broadcast_to(np.asarray(s16, dtype=np.float16), q.shape)
        outs = run_ptx(asm, cons, [q, np.full(q.shape, b0), np.full(q.shape, b1),
                                   s16.view(np.uint16)])
        return tuple(_f16(o).view(_T) for o in outs)

    b0, b1 = _zb(zc)
    return _h2_branch_of_tc_weights()(
        qw, 0, np.arange(n).view(_T), k0, np.arange(bkw).view(_T), scales.shape[1], b0, b1,
        n, bk, gs, _TL(scales.reshape(-1)), dequant8)


@pytest.mark.parametrize("gs,bk,bits", [(128, 128, 4), (64, 64, 4), (32, 128, 4),
                                        (64, 128, 3)])
def test_tc_weight_tile_matches_the_reference_dequantisation(gs, bk, bits):
    """The emulated H2 tile equals the float64 reference dequantisation rounded to fp16,
    bitwise, for every K tile of a random symmetric layer (BK <= GS: one scale per row per
    tile; BK > GS: one per word)."""
    k, n = 512, 24
    layer = random_layer(k, n, bits=bits, group_size=gs, symmetric=True, density=0.0,
                         generator=torch.Generator().manual_seed(gs + bk + bits))
    lay = build_layout(layer)
    assert lay.zconst is not None
    qw = lay.qw.numpy().view(np.uint32).astype(np.uint64)
    scales = layer.scales.numpy()
    ref = dequantize(layer, torch.float64).numpy().astype(np.float16)
    for k0 in range(0, k, bk):
        got = _tc_weights_h2(qw[:, k0 // 8:(k0 + bk) // 8], scales, float(lay.zconst), k0, bk,
                             gs)
        assert np.array_equal(got.view(np.uint16), ref[:, k0:k0 + bk].view(np.uint16)), k0
