"""Do two source trees compile the v1 kernels (``_gemv_kernel``, ``_gemm_kernel``) to the same
machine code? For refactorings of libortho/kernels that must not change what runs.

    git worktree add /tmp/before <rev>
    python experiments/compare_kernel_sass.py /tmp/before . [--procs 2] [--launch] [--only NAME]

Offline (no GPU needed): compiles a grid of variants for sm_90 with each tree's
``benchmarks/bench_compile_sass.py`` (Triton's bundled ptxas; 1-2 rows FMA decode and 16/64-row
GEMM, 2/4/8-bit codes, zero points, ortho rows / tile mode, per-row alpha, bias, masks,
split-K, x pairs, SWAP / JOIN) and compares the SASS with the kernel name masked.

``--launch`` (CUDA): also runs every case of tests/gpu/test_kernels_gpu.py through the
dispatcher of each tree, then compares the SASS of every v1 kernel those launches compiled
(so the launch path's own specialisations, e.g. KW for the FMA kernel, are included).

Prints one line per tree pair and exits 1 if anything differs. About 10 s of one core per
variant offline (86 variants).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))


def _grid(v):
    """{name: (kernel, constexprs, warps, stages)} from a tree's bench_compile_sass ``_v``."""
    tk = v.__globals__["tk"]
    out = {}
    for bm, cb, zc, orth, av, bias, even, split, xpf, xb in itertools.product(
            (1, 2), (4, 8, 2), *[(True, False)] * 8):
        flags = [not zc, orth, av, bias, not even, not split, not xpf, xb]
        if (av and not orth) or (xb and not xpf) or (xpf and cb != 4) or sum(flags) > 2:
            continue
        out[f"gemv_bm{bm}_c{cb}_" + "".join(str(int(f)) for f in flags)] = v(
            tk._gemv_kernel, 2, 1, BM=bm, BN=64, BK=256 if cb == 2 else 128, CBITS=cb,
            ZCONST=zc, HAS_ORTHO=orth, ALPHA_VEC=av, HAS_BIAS=bias, EVEN=even, USE_SPLIT=split,
            XPF=xpf, XBF16=xb)
    for bm, cb, swap, join, rows, orth, av, even, split in itertools.product(
            (16, 64), (4, 8, 2), *[(True, False)] * 7):
        flags = [orth, av, not even, not split, not swap, not join]
        if (av and not orth) or (join and cb == 2) or (rows and not orth) or sum(flags) > 3:
            continue
        bk = 128 if join or cb == 4 else (256 if cb == 2 else 64)
        bk = bk if join else max(bk, 16 * (32 // cb))
        out[f"gemm_bm{bm}_c{cb}_r{int(rows)}_" + "".join(str(int(f)) for f in flags)] = v(
            tk._gemm_kernel, 4, 3, BM=bm, BN=32 if swap else 64, BK=bk, CBITS=cb, SWAP=swap,
            JOIN=join, ORTHO_ROWS=rows, HAS_ORTHO=orth, ALPHA_VEC=av, EVEN=even,
            USE_SPLIT=split, E=32)
    names = sorted(out)
    return {n: out[n] for n in names[::max(1, len(names) // 64)]}


def _masked(text: str) -> str:
    return re.sub(r"_gem[mv]_kernel", "K", text)


def dump_offline(tree: str, part: str, only: str = "") -> dict:
    """{variant: SASS} of this process's share (``i/P``) of the grid, compiled from ``tree``."""
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
    import bench_compile_sass as B
    variants = _grid(B._v)
    variants.update({k: v for k, v in B.VARIANTS.items() if k.startswith(("gemv", "gemm"))})
    i, n = (int(x) for x in part.split("/"))
    out = {}
    for name in [v for v in sorted(variants) if only in v][i::n]:
        fn, consts, nw, ns = variants[name]
        try:
            _, sass, res = B.sass_mix(B.compile_variant(fn, consts, nw, ns).asm["cubin"])
            out[name] = _masked(res + "\n" + sass)
        except Exception as exc:  # a variant one tree cannot compile is a difference too
            out[name] = f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return out


def dump_launched(tree: str) -> dict:
    """{sha of SASS: count} over the v1 kernels compiled by running the GPU check cases."""
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks"), os.path.join(HERE, "..", "tests", "gpu")]
    import torch
    import bench_compile_sass as B
    import test_kernels_gpu as G
    from libortho.kernels import triton_kernels as tk
    gen = torch.Generator(device="cuda").manual_seed(123)
    failed = [c[0] for c in G.cases() if not G.run_case(c, gen)["ok"]]
    counts: Counter = Counter()
    for kern in (tk._gemv_kernel, tk._gemm_kernel):
        for cache, *_ in kern.device_caches.values():
            for compiled in cache.values():
                _, sass, res = B.sass_mix(compiled.asm["cubin"])
                counts[f"{kern.__name__}:{hashlib.sha1(_masked(res + sass).encode()).hexdigest()[:16]}"] += 1
    return {"failed": failed, "sass": dict(counts)}


def _run_children(tree: str, procs: int, launch: bool, only: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i in range(procs):
            path = os.path.join(tmp, f"{i}.json")
            jobs.append((path, subprocess.Popen([sys.executable, __file__, "--child", tree, f"{i}/{procs}", path, only])))
        if launch:
            path = os.path.join(tmp, "launch.json")
            jobs.append((path, subprocess.Popen([sys.executable, __file__, "--child-launch", tree, path])))
        for _, p in jobs:
            p.wait()
        offline, launched = {}, None
        for path, _ in jobs:
            data = json.load(open(path))
            if path.endswith("launch.json"):
                launched = data
            else:
                offline.update(data)
        return {"offline": offline, "launched": launched}


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        tree, part, path, only = sys.argv[2:6]
        json.dump(dump_offline(os.path.abspath(tree), part, only), open(path, "w"))
        return 0
    if sys.argv[1:2] == ["--child-launch"]:
        tree, path = sys.argv[2:4]
        json.dump(dump_launched(os.path.abspath(tree)), open(path, "w"))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--procs", type=int, default=2, help="compile processes per tree")
    ap.add_argument("--launch", action="store_true", help="also compare the kernels the GPU checks launch")
    ap.add_argument("--only", default="", help="only the offline variants whose name contains this")
    ap.add_argument("--json", default=None, help="write the per-variant verdicts here")
    args = ap.parse_args()
    a = _run_children(args.before, args.procs, args.launch, args.only)
    b = _run_children(args.after, args.procs, args.launch, args.only)
    verdicts = {n: ("identical" if a["offline"].get(n) == b["offline"].get(n) else "DIFFERENT")
                for n in sorted(set(a["offline"]) | set(b["offline"]))}
    bad = [n for n, v in verdicts.items() if v != "identical"]
    print(f"offline: {len(verdicts) - len(bad)}/{len(verdicts)} variants compile to identical SASS"
          + (f"; different: {bad}" if bad else ""))
    same_launch = True
    if args.launch:
        la, lb = a["launched"], b["launched"]
        same_launch = la["sass"] == lb["sass"] and not la["failed"] and not lb["failed"]
        print(f"launched: {sum(la['sass'].values())} vs {sum(lb['sass'].values())} v1 kernels compiled, "
              f"SASS multisets {'identical' if la['sass'] == lb['sass'] else 'DIFFERENT'}; "
              f"failed cases: {la['failed']} / {lb['failed']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"offline": verdicts, "launched": [a["launched"], b["launched"]]}, f, indent=1)
    return 0 if not bad and same_launch else 1


if __name__ == "__main__":
    sys.exit(main())
