"""GPU correctness of libortho.kernels.dual_stream_linear against a float64 reference.

Fresh random layers and inputs for every case (seeded from the clock unless --seed), output
buffers poisoned with NaN before each call (unwritten elements are caught), relative
Frobenius error ‖y − ref‖/‖ref‖ within fp16/bf16 bounds, and every case run twice: the two
results must be bitwise equal (split-K reduces in a fixed order, so a difference means a
race). Covers decode/prefill kernels, odd K/N, group 32/64/128, symmetric/asymmetric, bias,
empty ortho, heavy rows, scalar/per-row/0-d alpha, fp16/bf16 activations, bf16 ortho values,
2/3/8-bit codes, default and forced split-K configs, and the v2 decode kernel (forced
configs: register / cp.async pipelines, BM 1/2/4, rows past N and M, 3-bit, g 32/64,
|x| ~ 3000 for the fp16 half2 chains, fp32-math variant, fallback for asymmetric zeros),
and kernel v3 (``tc …`` cases: M = 2..64, ortho density 0 / 1 / 2 %, the fused low-rank
part, per-row alpha, forced configs BM 16/32/64, BN 64/128, XT on/off, split-K, heavy rows,
the winners of the shipped tc table on the benchmark shapes, bf16 x and asymmetric zeros on
its fp32 path, and the default dispatch). Kernel v3 is off by default; the ``tc …`` cases
switch it on for their calls, and every case records whether the tc kernel ran and whether
it took the fp16 (inline PTX) dequantisation (``tc_launches``, ``tc_h2``): that path becomes
the default only once these cases pass on the H200 (docs/kernel_notes.md).

As a pytest module (skipped without CUDA), one test per case with a fixed seed::

    python -m pytest tests/gpu/test_kernels_gpu.py

As a script (seeded from the clock; --part i/P runs every P-th case, for P parallel
processes, since compiling dominates)::

    python tests/gpu/test_kernels_gpu.py [--json FILE] [--seed S] [--part i/P]

The script runs the ``tc …`` cases first and rewrites --json after every case
(``complete`` false until the part has finished), so a part stopped on time still reports
the cases it finished.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import pytest
import torch

from libortho.kernels import dispatch, dual_stream_linear, reference_dual_stream
from libortho.kernels.synthetic import random_layer

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def cases():
    """(name, layer kwargs, rows, x dtype, alpha kind, config or None)."""
    big = dict(group_size=128, symmetric=True, density=0.01)
    yield "4096x4096 m1 default", dict(k=4096, n=4096, **big), 1, torch.float16, "one", None
    yield "4096x4096 m1 a0", dict(k=4096, n=4096, **big), 1, torch.float16, "zero", None
    yield "11008x4096 m4 rows", dict(k=4096, n=11008, **big), 4, torch.float16, "rows", None
    yield "4096x14336 m16 bf16", dict(k=14336, n=4096, **big), 16, torch.bfloat16, "one", None
    yield "8192x8192 m64", dict(k=8192, n=8192, **big), 64, torch.float16, "one", None
    yield "4096x4096 m200 prefill", dict(k=4096, n=4096, **big), 200, torch.float16, "half", None
    odd = dict(group_size=64, symmetric=False, density=0.02, bias=True, heavy_rows=3)
    for m in (1, 2, 3, 16, 17, 65):
        for dt in (torch.float16, torch.bfloat16):
            yield (f"odd 1030x2053 m{m} {dt}", dict(k=2053, n=1030, **odd), m, dt, "rows",
                   None)
    for g in (32, 64, 128):
        yield (f"g{g} asym bias m1", dict(k=1536, n=768, group_size=g, symmetric=False,
                                          bias=True, density=0.01), 1, torch.float16, "one", None)
        yield (f"g{g} sym m8", dict(k=1536, n=768, group_size=g, density=0.01), 8,
               torch.bfloat16, "zero0d", None)
    yield "empty ortho m1", dict(k=1024, n=512, density=0.0), 1, torch.float16, "one", None
    yield "empty ortho m32", dict(k=1024, n=512, density=0.0), 32, torch.float16, "one", None
    yield ("bf16 ortho values m3", dict(k=1024, n=640, density=0.05, val_dtype=torch.bfloat16),
           3, torch.float16, "one", None)
    yield "heavy rows m1", dict(k=4096, n=256, density=0.001, heavy_rows=8), 1, \
        torch.float16, "one", None
    yield "heavy rows m16", dict(k=4096, n=256, density=0.001, heavy_rows=8), 16, \
        torch.float16, "one", None
    for bits in (2, 3, 8):
        for m in (1, 12):
            yield (f"{bits}-bit m{m}", dict(k=1024, n=384, bits=bits, group_size=64,
                                            symmetric=False, density=0.01, bias=True), m,
                   torch.float16, "one", None)
    gemv = dict(kernel="gemv", BM=1, BN=64, BK=128, num_warps=4, num_stages=3, E=16)
    gemm = dict(kernel="gemm", BM=16, BN=64, BK=128, num_warps=4, num_stages=4, E=32,
                SWAP=True, JOIN=True)
    for sp in (1, 3, 16):
        yield (f"forced gemv split {sp}", dict(k=4096, n=1000, density=0.01, bias=True), 1,
               torch.float16, "one", dict(gemv, SPLIT=sp))
        yield (f"forced gemm split {sp}", dict(k=4096, n=1000, density=0.01, bias=True), 9,
               torch.bfloat16, "rows", dict(gemm, SPLIT=sp))
    yield ("forced gemm slot-order", dict(k=4096, n=1000, density=0.01), 16, torch.float16,
           "one", dict(gemm, JOIN=False, SWAP=False, SPLIT=2))
    # v2 decode kernel (fp16x2 dequantisation, inline-PTX loads, register or cp.async
    # pipelines), forced configs; "xscale" multiplies x (fp16 range of the half2 chains).
    v2 = dict(kernel="gemv2", BM=1, BN=64, GPT=1, num_warps=2, num_stages=1, E=0, STAGES=1)
    sym = dict(group_size=128, symmetric=True, density=0.01)
    yield ("v2 8192x8192 m1 regs split4", dict(k=8192, n=8192, **sym), 1, torch.float16, "one",
           dict(v2, SPLIT=4))
    yield ("v2 4096x4096 m1 cp.async a0", dict(k=4096, n=4096, **sym), 1, torch.float16,
           "zero", dict(v2, BN=128, num_warps=4, STAGES=4, SPLIT=8))
    yield ("v2 14336x4096 m1 cp.async GPT2", dict(k=4096, n=14336, **sym), 1, torch.float16,
           "one", dict(v2, num_warps=4, STAGES=3, GPT=2, SPLIT=2))
    yield ("v2 n1000 m2 rows bias split3", dict(k=4096, n=1000, bias=True, heavy_rows=2, **sym),
           2, torch.float16, "rows", dict(v2, BM=2, SPLIT=3))
    yield ("v2 n1000 m3 BM4 bf16", dict(k=4096, n=1000, bias=True, **sym), 3, torch.bfloat16,
           "rows", dict(v2, BM=4, num_warps=4, STAGES=3, SPLIT=2))
    yield ("v2 4096x4096 m4 BM4", dict(k=4096, n=4096, **sym), 4, torch.float16, "half",
           dict(v2, BM=4, num_warps=4, SPLIT=4))
    yield ("v2 4096x4096 m16 BM4", dict(k=4096, n=4096, **sym), 16, torch.float16, "one",
           dict(v2, BM=4, BN=32, STAGES=3, SPLIT=2))
    yield ("v2 3-bit g64 m1", dict(k=2048, n=768, bits=3, group_size=64, symmetric=True,
                                   density=0.01), 1, torch.float16, "one", dict(v2, GPT=2))
    yield ("v2 g32 m1 bias", dict(k=2048, n=768, group_size=32, symmetric=True, bias=True,
                                  density=0.02), 1, torch.float16, "one", dict(v2, GPT=4))
    yield ("v2 m1 |x| ~ 3000", dict(k=4096, n=4096, xscale=3000.0, **sym), 1, torch.float16,
           "one", dict(v2, SPLIT=4))
    yield ("v2 m1 no-H2 (fp32 math)", dict(k=4096, n=4096, **sym), 1, torch.float16, "one",
           dict(v2, H2=False, SPLIT=4))
    yield ("v2 m1 ortho prefetch heavy split8", dict(k=4096, n=1000, heavy_rows=3, bias=True,
                                                     **sym), 1, torch.float16, "rows",
           dict(v2, OPF=True, SPLIT=8, E=8))
    yield ("v2 m1 ortho prefetch cp.async", dict(k=8192, n=8192, **sym), 1, torch.float16,
           "one", dict(v2, OPF=True, STAGES=3, SPLIT=8))
    yield ("v2 asym falls back to v1", dict(k=4096, n=512, group_size=128, symmetric=False,
                                            density=0.01), 1, torch.float16, "one", v2)
    # kernel v3 (tc.py): default dispatch (tc table / heuristics) and forced configs
    tc = dict(kernel="tc", BM=16, BN=64, BK=128, num_warps=4, STAGES=3, E=0, SPLIT=0, XT=True)
    for m in (2, 3, 4, 8, 16, 32, 64):
        for dens in (0.0, 0.01, 0.02):
            yield (f"tc 4096x4096 m{m} d{dens:g}", dict(k=4096, n=4096, group_size=128,
                                                         symmetric=True, density=dens), m,
                   torch.float16, "rows" if m % 2 else "one", None)
    for m in (2, 5, 16, 33, 64):
        yield (f"tc lowrank r40 m{m} rows", dict(k=4096, n=1536, group_size=128, symmetric=True,
                                                 density=0.01, rank=40, bias=True), m,
               torch.float16, "rows", None)
    yield ("tc lowrank r64 d0 m8 one", dict(k=2048, n=1024, group_size=128, symmetric=True,
                                            density=0.0, rank=64), 8, torch.float16, "one", tc)
    yield ("tc BN128 w8 split3 m16", dict(k=8192, n=8192, **sym), 16, torch.float16, "half",
           dict(tc, BN=128, num_warps=8, SPLIT=3))
    yield ("tc BM32 STAGES4 m24 rows", dict(k=4096, n=1000, bias=True, **sym), 24,
           torch.float16, "rows", dict(tc, BM=32, STAGES=4, SPLIT=4))
    yield ("tc BM64 XT off m50", dict(k=4096, n=1000, **sym), 50, torch.float16, "rows",
           dict(tc, BM=64, XT=False, SPLIT=2))
    yield ("tc heavy rows E1 m4", dict(k=4096, n=256, density=0.001, heavy_rows=8,
                                       group_size=128), 4, torch.float16, "one",
           dict(tc, E=1, SPLIT=4))
    yield ("tc g32 bf16 m6", dict(k=2048, n=768, group_size=32, symmetric=True,
                                      density=0.01, bias=True), 6, torch.bfloat16, "rows", tc)
    yield ("tc asym g64 m12", dict(k=2048, n=768, group_size=64, symmetric=False,
                                   density=0.02), 12, torch.float16, "one", tc)
    yield ("tc 3-bit m8", dict(k=2048, n=768, bits=3, group_size=64, symmetric=True,
                               density=0.01), 8, torch.float16, "one", tc)
    yield ("tc m2 |x| ~ 3000", dict(k=4096, n=4096, xscale=3000.0, **sym), 2, torch.float16,
           "one", tc)
    # the shipped tc table's winners (libortho/kernels/tc_configs.json) on benchmark shapes:
    # fp16 x, symmetric g = 128, so the fp16 inline-PTX dequantisation runs
    yield ("tc table BM16 BN128 w8 m16 4096x4096", dict(k=4096, n=4096, **sym), 16,
           torch.float16, "one", dict(tc, BN=128, num_warps=8))
    yield ("tc table BM16 BN128 split8 m16 4096x14336", dict(k=14336, n=4096, **sym), 16,
           torch.float16, "rows", dict(tc, BN=128, SPLIT=8))
    yield ("tc table BM32 BN128 split8 m32 4096x11008", dict(k=11008, n=4096, **sym), 32,
           torch.float16, "one", dict(tc, BM=32, BN=128, SPLIT=8))
    yield ("tc table BM32 BN64 st4 m32 14336x4096", dict(k=4096, n=14336, **sym), 32,
           torch.float16, "half", dict(tc, BM=32, STAGES=4))
    yield ("tc table BM64 BN64 m64 8192x8192", dict(k=8192, n=8192, **sym), 64,
           torch.float16, "one", dict(tc, BM=64))
    yield ("tc table BM64 BN128 w8 m64 11008x4096 d2", dict(k=4096, n=11008, group_size=128,
                                                              symmetric=True, density=0.02),
           64, torch.float16, "rows", dict(tc, BM=64, BN=128, num_warps=8))
    yield ("tc a0 BM16 m16", dict(k=4096, n=4096, **sym), 16, torch.float16, "zero",
           dict(tc, BN=128))
    yield ("tc m64 |x| ~ 3000", dict(k=4096, n=4096, xscale=3000.0, **sym), 64, torch.float16,
           "one", dict(tc, BM=64))
    yield ("forced gemm tile-ortho", dict(k=4096, n=1000, density=0.02, heavy_rows=2), 40,
           torch.bfloat16, "rows", dict(gemm, BM=64, SWAP=False, ORTHO="tile", E=64, SPLIT=3))


def run_case(case, gen: torch.Generator) -> dict:
    """Run one case of ``cases()`` twice into NaN-poisoned outputs; the result row (ok: finite,
    both runs bitwise equal and the relative error within TOL)."""
    name, kw, m, dt, akind, cfg = case
    kw = dict(kw)
    k, n = kw.pop("k"), kw.pop("n")
    xscale = kw.pop("xscale", 1.0)
    lowrank = kw.get("rank", 0) > 0
    layer = random_layer(k, n, device="cuda", generator=gen, **kw)
    x = (torch.randn(m, k, device="cuda", generator=gen) * xscale).to(dt)
    alpha = {"one": 1.0, "half": 0.5, "zero": 0.0,
             "rows": torch.rand(m, device="cuda", generator=gen),
             "zero0d": torch.tensor(0.0, device="cuda")}[akind]
    outs, tc_calls = [], []
    real_launch, v3 = dispatch._launch_tc, dispatch.V3_ENABLED

    def spy(x2, layer_, lay, cfg_, *rest):  # records each tc launch and its dequantisation
        tc_calls.append(dispatch.tc_uses_h2(lay, x2, cfg_))
        return real_launch(x2, layer_, lay, cfg_, *rest)
    dispatch._launch_tc = spy
    if name.startswith("tc"):
        dispatch.set_v3(True)  # default-dispatch tc cases: what v3 would run by default
    try:
        for _ in range(2):
            out = torch.full((m, n), float("nan"), dtype=dt, device="cuda")
            dual_stream_linear(x, layer, alpha, out=out, config=cfg, lowrank=lowrank)
            outs.append(out)
    finally:
        dispatch._launch_tc = real_launch
        dispatch.set_v3(v3)
    torch.cuda.synchronize()
    ref = reference_dual_stream(x, layer, alpha, lowrank=lowrank)
    err = ((outs[0].double() - ref).norm() / ref.norm()).item()
    finite = bool(torch.isfinite(outs[0]).all())
    same = bool(torch.equal(outs[0], outs[1]))
    ok = finite and same and err < TOL[dt]
    return dict(name=name, m=m, n=n, k=k, dtype=str(dt), err=err, finite=finite,
                repeat_equal=same, ok=ok, dt=dt, tc_launches=len(tc_calls),
                tc_h2=any(tc_calls))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_kernel_case_on_gpu(case):
    r = run_case(case, torch.Generator(device="cuda").manual_seed(0))
    assert r["finite"], "unwritten (NaN) or non-finite outputs"
    assert r["repeat_equal"], "two runs differ (split-K race)"
    assert r["err"] < TOL[r["dt"]], f"relative error {r['err']:.2e} >= {TOL[r['dt']]:.0e}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", default="", help="run only the cases whose name starts with this")
    ap.add_argument("--part", default="0/1", help="i/P: run every P-th case from the i-th "
                    "(P processes in parallel compile P times faster)")
    args = ap.parse_args()
    part, parts = (int(v) for v in args.part.split("/"))
    seed = args.seed if args.seed is not None else int(time.time()) + 1000 * part
    gen = torch.Generator(device="cuda").manual_seed(seed)
    print(f"seed {seed}, device {torch.cuda.get_device_name(0)}", flush=True)
    results, failures = [], 0
    todo = [c for c in cases() if c[0].startswith(args.only)]
    todo = [c for c in todo if c[0].startswith("tc")] + [c for c in todo
                                                         if not c[0].startswith("tc")]

    def save(complete: bool) -> None:  # after every case: a part killed on time keeps its rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(seed=seed, device=torch.cuda.get_device_name(0), cases=results,
                               complete=complete), f, indent=1)
    for idx, case in enumerate(todo):  # kernel v3's cases first: the ones not yet verified
        if idx % parts != part:
            continue
        try:
            r = run_case(case, gen)
        except Exception as exc:  # e.g. a Triton compile error: record it, go on
            r = dict(name=case[0], m=case[2], err=float("nan"), finite=False, repeat_equal=False,
                     ok=False, dt=case[3], error=repr(exc)[:2000])
            print(f"ERROR {case[0]}: {exc!r}"[:3000], flush=True)
        failures += not r["ok"]
        results.append(r)
        path = (" [tc fp16]" if r.get("tc_h2") else " [tc fp32]" if r.get("tc_launches")
                else "")
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['name']:36s} rel.err {r['err']:.2e} "
              f"(tol {TOL[r['dt']]:.0e}){'' if r['finite'] else ' NON-FINITE/UNWRITTEN'}"
              f"{'' if r['repeat_equal'] else ' RUNS DIFFER'}{path}", flush=True)
        del r["dt"]
        save(False)
    print(f"{len(results) - failures}/{len(results)} cases passed (seed {seed})")
    save(True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
