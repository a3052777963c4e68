"""Compile the libortho kernels for sm_90 on a machine without a GPU and report resources.

Uses Triton's bundled ptxas/cuobjdump: registers, spills, shared memory and the SASS
instruction mix of each variant's main K loop (counts of HGMMA/HMMA, FFMA, LOP3, SHF, LDG,
LDGSTS, ...), so variants can be compared before spending device time. Divide the loop's
instruction count by the weights one iteration handles per thread (BN·BK / threads) for
instructions per weight. Usage:

    python benchmarks/bench_compile_sass.py [--dump DIR] [--only NAME]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from libortho.kernels import triton_kernels as tk

PTR = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "crow_ptr", "col_ptr", "val_ptr", "a_ptr",
       "y_ptr"]
PTR_T = dict(x_ptr="*fp16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", b_ptr="*fp16",
             crow_ptr="*i32", col_ptr="*i16", val_ptr="*fp16", a_ptr="*fp32", y_ptr="*fp16",
             ws_ptr="*fp32", cnt_ptr="*i32")
SCAL = dict(alpha="fp32", zconst="fp32", zb0="i32", zb1="i32", zc="fp32", KPSW="i32", onebits="i32", KPS="i32", SPLIT="i32", M="i32", N="i32", K="i32", KW="i32", G="i32",
            stride_xm="i32", stride_ym="i32")


def compile_variant(fn, consts: dict, num_warps: int, num_stages: int):
    """Compile ``fn`` for sm_90 with 16-divisible pointers/sizes (M unspecialised)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in PTR_T:
            sig[name] = PTR_T[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = SCAL[name]
            if name in ("N", "K", "stride_xm", "stride_ym", "KPS", "KPSW") or (
                    name == "KW" and fn is not tk._gemv_kernel):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def sass_mix(cubin: bytes):
    """(opcode histogram, SASS text, resource line) via Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                         text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    res = f"regs={m.group(1)} stack={m.group(2)} smem={m.group(3)} local={m.group(4)}" if m else res
    ops = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?", line)
        if m:
            ops[m.group(1)] += 1
    return ops, out, res



def _v(kernel, nw, ns, **kw):
    base = dict(GS=128, CBITS=4, ZCONST=True, HAS_BIAS=False, HAS_ORTHO=False, ALPHA_VEC=False,
                EVEN=True, USE_SPLIT=True, E=16)
    if kernel is tk._gemm_kernel:
        base.update(FMA=False, JOIN=True, DOT_F32=False, SWAP=True,
                    ORTHO_ROWS=kw.get("BM", 16) <= 16, XPF=False, XBF16=False)
    elif kernel is tk._gemv2_kernel:
        base = dict(GS=128, HAS_BIAS=False, HAS_ORTHO=False, ALPHA_VEC=False, USE_SPLIT=True,
                    E=16, H2=True, XBF16=False, GPT=1, XVEC=True, SBC=True, STAGES=1, OPF=False)
    else:
        base.update(FMA=True, XPF=True, XBF16=False, SWAP=False, JOIN=False, DOT_F32=False,
                    ORTHO_ROWS=False)
    base.update(kw)
    return (kernel, base, nw, ns)


VARIANTS = {  # the configs tuned on the H200 (libortho/kernels/tuned_configs.json) and kin
    # v2 decode kernel, the configs tuned on the H200 (tuned_configs.json, M = 1 and 4)
    "v2_m1_bn64_w2": _v(tk._gemv2_kernel, 2, 1, BM=1, BN=64),
    "v2_m1_bn128_w4": _v(tk._gemv2_kernel, 4, 1, BM=1, BN=128),
    "v2_m1_bn64_w4_cpasync3_gpt2": _v(tk._gemv2_kernel, 4, 1, BM=1, BN=64, STAGES=3, GPT=2),
    "v2_m1_bn64_w2_ortho": _v(tk._gemv2_kernel, 2, 1, BM=1, BN=64, HAS_ORTHO=True),
    "v2_m1_bn64_w2_ortho_opf": _v(tk._gemv2_kernel, 2, 1, BM=1, BN=64, HAS_ORTHO=True,
                                  OPF=True),
    "v2_m1_fp32math": _v(tk._gemv2_kernel, 2, 1, BM=1, BN=64, H2=False),
    "v2_m4_bn32_w2_cpasync3": _v(tk._gemv2_kernel, 2, 1, BM=4, BN=32, STAGES=3),
    "v2_m4_bn64_w4_cpasync3": _v(tk._gemv2_kernel, 4, 1, BM=4, BN=64, STAGES=3),
    "gemv_m1_bn64_bk128": _v(tk._gemv_kernel, 2, 1, BM=1, BN=64, BK=128),
    "gemv_m1_bn64_bk64": _v(tk._gemv_kernel, 2, 1, BM=1, BN=64, BK=64),
    "gemv_m1_ortho": _v(tk._gemv_kernel, 2, 1, BM=1, BN=64, BK=128, HAS_ORTHO=True),
    "gemv_m1_asym_g32": _v(tk._gemv_kernel, 2, 1, BM=1, BN=64, BK=128, ZCONST=False, GS=32),
    "gemv_m1_no_xpf": _v(tk._gemv_kernel, 2, 1, BM=1, BN=64, BK=128, XPF=False),
    "gemv_m2": _v(tk._gemv_kernel, 2, 1, BM=2, BN=64, BK=64),
    "gemm_m16_swap": _v(tk._gemm_kernel, 4, 4, BM=16, BN=32, BK=128),
    "gemm_m16_swap_ortho": _v(tk._gemm_kernel, 4, 4, BM=16, BN=32, BK=128, HAS_ORTHO=True,
                              E=32),
    "gemm_m16_slots": _v(tk._gemm_kernel, 4, 4, BM=16, BN=64, BK=128, JOIN=False),
    "gemm_m64_tile_ortho": _v(tk._gemm_kernel, 4, 4, BM=64, BN=64, BK=128, SWAP=False,
                              HAS_ORTHO=True, E=64),
}


def main_loop_mix(sass: str) -> collections.Counter:
    """Opcode histogram of the longest backward-branch loop (the K loop)."""
    lines = sass.splitlines()
    best = None
    for line in lines:
        m = re.search(r"/\*([0-9a-f]{4})\*/\s+(@!?P\d\s+)?BRA (0x[0-9a-f]+)", line)
        if m:
            here, tgt = int(m.group(1), 16), int(m.group(3), 16)
            if tgt < here and (best is None or here - tgt > best[1] - best[0]):
                best = (tgt, here)
    ops = collections.Counter()
    for line in lines:
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m and best and best[0] <= int(m.group(1), 16) <= best[1]:
            ops[m.group(2)] += 1
    return ops


KEYS = ["HGMMA", "HMMA", "FFMA", "FADD", "FMUL", "LOP3", "SHF", "IMAD", "IADD3", "I2F", "F2F",
        "F2FP", "PRMT", "LDG", "LDS", "STS", "LDSM", "SHFL", "BAR", "LDGSTS", "UTMALDG"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None, help="write .sass/.ptx/.ttgir per variant here")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    print(f"triton {triton.__version__}")
    for name, (fn, consts, nw, ns) in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        k = compile_variant(fn, consts, nw, ns)
        ops, sass, res = sass_mix(k.asm["cubin"])
        loop = main_loop_mix(sass)
        print(f"{name:20s} {res} loop={sum(loop.values())} instrs: "
              + " ".join(f"{o}={loop[o]}" for o in KEYS if loop[o]))
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                with open(os.path.join(args.dump, f"{name}.{ext}"), "w") as f:
                    f.write(k.asm[ext])
            with open(os.path.join(args.dump, f"{name}.sass"), "w") as f:
                f.write(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
