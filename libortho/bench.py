"""``libortho bench``: layer-level speed of the fused dual-stream kernel on one GPU.

Rows, per layer shape (N = out, K = in) and token rows M:

* ``fp16``        torch F.linear with an fp16 weight (cuBLAS)
* ``torch_int4``  torch.ops.aten._weight_int4pack_mm (tinygemm, bf16 activations, g = 128)
* ``a0``          libortho, alpha = 0 (base stream only)
* ``a1_<d>``      libortho, alpha = 1 with d % ortho density (0.5, 1, 2)
* ``a1_1_rows``   libortho, per-row alpha tensor, 1 % ortho
* ``naive_1``     libortho alpha = 0 + a separate torch.sparse CSR product (1 %)

Timing: every call of a row is captured in one CUDA graph that walks through enough copies of
the weights (and inputs) to exceed the L2 several times; the graph is replayed after warm-up
and each replay timed with CUDA events; the reported time is the median over replays
divided by the calls per replay (so launch overhead is excluded, as in a captured decode
step). GB/s counts every byte the row must read or write once (weights, scales, zeros if
read, ortho stream, x, y) and is shown next to the card's measured copy bandwidth
(device-to-device copy of 1 GiB, bytes read + written).

``--tune`` first sweeps tile configs per (M, N, K) and uses the fastest (``--save-configs``
writes them as the table libortho.kernels.configs loads).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SHAPES: List[Tuple[int, int]] = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096),
                                 (4096, 14336), (8192, 8192)]
BATCHES: List[int] = [1, 4, 16, 64]
DENSITIES: List[float] = [0.005, 0.01, 0.02]
ROTATE_BYTES = 256 << 20  # each timed graph walks over at least this many weight bytes


# --------------------------------------------------------------------------- timing
def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), median."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def time_calls(calls: Sequence[Callable[[], Any]], reps: int = 100, warmup: int = 10
               ) -> Dict[str, Any]:
    """Median µs per call over ``reps`` timed graph replays of all ``calls`` in sequence.

    Falls back to timing eager calls one by one with events when graph capture fails
    (``method`` says which). Returns {"us", "p10", "p90", "method", "reps"}.
    """
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        run, per, method = graph.replay, len(calls), "cuda_graph"
    except Exception:  # e.g. a library call that cannot be captured
        torch.cuda.synchronize()
        graph = None
        idx = [0]

        def run():
            calls[idx[0] % len(calls)]()
            idx[0] += 1
        per, method = 1, "eager_events"
        reps = max(reps, 100)
    for _ in range(warmup):
        run()
    events = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        events.append((e0, e1))
    torch.cuda.synchronize()
    us = sorted(e0.elapsed_time(e1) * 1e3 / per for e0, e1 in events)
    del graph
    return dict(us=statistics.median(us), p10=us[len(us) // 10], p90=us[(9 * len(us)) // 10],
                method=method, reps=reps)


# --------------------------------------------------------------------------- operands
def _copies(bytes_per_copy: int, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(ROTATE_BYTES / max(1, bytes_per_copy))))


def base_layers(n: int, k: int, count: int, group_size: int = 128, seed: int = 0) -> list:
    """``count`` random INT4 layers (no ortho entries yet) on the GPU."""
    from libortho.kernels.synthetic import random_layer
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [random_layer(k, n, group_size=group_size, density=0.0, device="cuda",
                         generator=gen) for _ in range(count)]


def with_ortho(base: Any, density: float, seed: int) -> Any:
    """A layer sharing ``base``'s INT4 buffers with a fresh Bernoulli(density) CSR stream."""
    from libortho.kernels.synthetic import SyntheticLayer
    n, k = base.out_features, base.in_features
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mask = torch.rand(n, k, generator=gen, device="cuda") < density
    rows, cols = mask.nonzero(as_tuple=True)
    crow = torch.zeros(n + 1, dtype=torch.int32, device="cuda")
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0).to(torch.int32)
    val = (torch.randn(rows.numel(), generator=gen, device="cuda") * 0.02).half()
    return SyntheticLayer(k, n, base.bits, base.group_size, base.qweight, base.scales,
                          base.zeros, crow, cols.to(torch.int32), val, base.bias)


def layer_bytes(layer: Any, m: int, with_ortho: bool, col_bytes: int = 2) -> int:
    """Bytes a fused call must move: base (+ zeros unless symmetric constant) (+ ortho)."""
    from libortho.kernels.layout import get_layout
    lay = get_layout(layer)
    n, k = layer.out_features, layer.in_features
    b = layer.qweight.numel() + layer.scales.numel() * 2 + m * k * 2 + m * n * 2
    if lay.zconst is None:
        b += layer.zeros.numel() * 2
    if with_ortho:
        b += (n + 1) * 4 + layer.ortho_col.numel() * (col_bytes + 2)
    return b


def int4pack(n: int, k: int, count: int, group_size: int = 128) -> Optional[list]:
    """``count`` weights packed for torch's tinygemm kernel, or None if unavailable."""
    try:
        out = []
        for _ in range(count):
            w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
            packed = torch._convert_weight_to_int4pack(w, 8)
            sz = torch.randn(k // group_size, n, 2, device="cuda").to(torch.bfloat16) * 0.01
            out.append((packed, sz))
        return out
    except Exception as exc:  # pragma: no cover - depends on the torch build
        print(f"torch int4 packing unavailable: {exc!r}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------- bench
def bench_shape(n: int, k: int, batches: Sequence[int], reps: int, densities: Sequence[float],
                rows_wanted: Sequence[str], log: Callable[[str], None],
                baseline: Optional[dict] = None) -> List[dict]:
    """All rows for one layer shape at the given token-row counts. ``baseline``: a second
    config table (``configs.read_table``); adds rows ``a0_base`` / ``a1_1_base`` that run
    the same layers with that table's configs (before/after on one card in one run)."""
    from libortho.kernels import dual_stream_linear, prepare
    from libortho.kernels.configs import select_config
    results: List[dict] = []
    nb = n * k // 2 + n * (k // 128) * 2
    nl = _copies(nb)
    bases = base_layers(n, k, nl, seed=n * 31 + k)
    dens_layers = {d: [with_ortho(b, d, seed=i + int(d * 1e4)) for i, b in enumerate(bases)]
                   for d in densities}
    for d in densities:
        for lay in dens_layers[d]:
            prepare(lay)
    for b in bases:
        prepare(b)
    nf = _copies(n * k * 2, cap=16)
    w16 = ([torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(nf)]
           if "fp16" in rows_wanted else [])
    i4 = int4pack(n, k, _copies(nb)) if "torch_int4" in rows_wanted else None
    d1 = 0.01 if 0.01 in densities else densities[0]
    csr = []
    if "naive_1" in rows_wanted:
        for lay in dens_layers[d1]:
            csr.append(torch.sparse_csr_tensor(lay.ortho_crow, lay.ortho_col, lay.ortho_val,
                                               size=(n, k)))
    for m in batches:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(nl)]
        rowa = torch.rand(m, device="cuda")

        def add(row: str, calls, nbytes: Optional[int], extra: Optional[dict] = None):
            r = time_calls(calls, reps=reps)
            r.update(row=row, n=n, k=k, m=m, copies=len(calls))
            if nbytes:
                r["bytes"] = nbytes
                r["gbps"] = nbytes / (r["us"] * 1e-6) / 1e9
            if extra:
                r.update(extra)
            results.append(r)
            log(f"  N={n:5d} K={k:5d} M={m:3d} {row:12s} {r['us']:8.2f} us"
                + (f"  {r['gbps']:7.0f} GB/s" if nbytes else "") + f"  [{r['method']}]")

        if w16:
            x16 = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in w16]
            add("fp16", [(lambda w=w, x=x: F.linear(x, w)) for w, x in zip(w16, x16)],
                n * k * 2 + m * k * 2 + m * n * 2)
        if i4:
            xb = [x.to(torch.bfloat16) for x in xs]
            try:
                add("torch_int4", [(lambda p=p, x=x: torch._weight_int4pack_mm(x, p[0], 128, p[1]))
                                   for p, x in zip(i4, xb)],
                    n * k // 2 + (k // 128) * n * 4 + m * k * 2 + m * n * 2)
            except Exception as exc:
                log(f"  torch_int4 failed: {exc!r}")
        if "a0" in rows_wanted:
            add("a0", [(lambda l=l, x=x: dual_stream_linear(x, l, 0.0))
                       for l, x in zip(bases, xs)], layer_bytes(bases[0], m, False))
        for d in densities:
            name = f"a1_{d * 100:g}"
            if name in rows_wanted or "a1" in rows_wanted:
                ls = dens_layers[d]
                add(name, [(lambda l=l, x=x: dual_stream_linear(x, l, 1.0))
                           for l, x in zip(ls, xs)], layer_bytes(ls[0], m, True),
                    dict(nnz=int(ls[0].ortho_col.numel())))
        if baseline is not None:
            bc = select_config(m, n, k, 128, table=baseline)
            add("a0_base", [(lambda l=l, x=x: dual_stream_linear(x, l, 0.0, config=bc))
                            for l, x in zip(bases, xs)], layer_bytes(bases[0], m, False),
                dict(config=bc))
            ls = dens_layers[d1]
            add("a1_1_base", [(lambda l=l, x=x: dual_stream_linear(x, l, 1.0, config=bc))
                              for l, x in zip(ls, xs)], layer_bytes(ls[0], m, True),
                dict(config=bc))
        if "a1_1_rows" in rows_wanted:
            ls = dens_layers[d1]
            add("a1_1_rows", [(lambda l=l, x=x: dual_stream_linear(x, l, rowa))
                              for l, x in zip(ls, xs)], layer_bytes(ls[0], m, True) + m * 4)
        if csr:
            ls = dens_layers[d1]

            def naive(l, x, c):
                y = dual_stream_linear(x, l, 0.0)
                return y.add_((c @ x.t()).t())
            try:
                add("naive_1", [(lambda l=l, x=x, c=c: naive(l, x, c))
                                for l, x, c in zip(ls, xs, csr)],
                    layer_bytes(ls[0], m, False) + (n + 1) * 4
                    + ls[0].ortho_col.numel() * 6 + 2 * m * n * 2)
            except Exception as exc:
                log(f"  naive_1 failed: {exc!r}")
        del xs
    del bases, dens_layers, w16, i4, csr
    torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------- tuning
def candidate_configs(m: int) -> List[dict]:
    """Configs swept per token-row count (SPLIT swept separately; it does not recompile)."""
    c: List[dict] = []
    if m <= 2:
        for bn, bk, w, st in ((64, 128, 2, 1), (64, 64, 2, 1), (32, 64, 2, 1), (128, 64, 4, 1),
                              (32, 128, 2, 1)):
            c.append(dict(kernel="gemv", BM=m, BN=bn, BK=bk, num_warps=w, num_stages=st, E=0))
    elif m <= 4:
        c.append(dict(kernel="gemv", BM=2, BN=64, BK=64, num_warps=2, num_stages=4, E=0))
    if 2 < m <= 16:
        for bn, swap in ((32, True), (64, True), (32, False)):
            c.append(dict(kernel="gemm", BM=16, BN=bn, BK=128, num_warps=4, num_stages=4,
                          E=0, SWAP=swap, JOIN=True, ORTHO="rows"))
    if m > 16:
        for bm, bn, w, st in ((64, 64, 4, 4), (32, 64, 4, 4), (64, 128, 8, 3)):
            c.append(dict(kernel="gemm", BM=bm, BN=bn, BK=128, num_warps=w, num_stages=st,
                          E=0, SWAP=False, JOIN=True, ORTHO="tile"))
    return c


def candidate_configs_v2(m: int) -> List[dict]:
    """v2 decode-kernel configs (``kernel="gemv2"``) per token-row count, M <= 16 (M > 4 runs
    cdiv(M, 4) row tiles over the same weights, the later ones from L2). E is fixed at 16
    while sweeping (so SPLIT does not recompile) and stored as 0 (automatic)."""
    if m > 16:
        return []
    if m == 1:  # (BM, BN, warps, STAGES, GPT, OPF)
        shapes = ((1, 64, 2, 1, 1, 0), (1, 128, 4, 1, 1, 0), (1, 64, 2, 3, 1, 0),
                  (1, 128, 4, 4, 1, 0), (1, 64, 4, 3, 2, 0), (1, 64, 2, 1, 1, 1),
                  (1, 64, 2, 3, 1, 1))
    elif m == 2:
        shapes = ((2, 64, 2, 1, 1, 0), (2, 64, 2, 3, 1, 0), (2, 128, 4, 3, 1, 0))
    else:
        shapes = ((4, 64, 4, 1, 1, 0), (4, 64, 4, 3, 1, 0), (4, 32, 2, 3, 1, 0))
    return [dict(kernel="gemv2", BM=bm, BN=bn, GPT=gpt, num_warps=w, num_stages=1, STAGES=st,
                 OPF=bool(opf), E=16) for bm, bn, w, st, gpt, opf in shapes]


def tune(shapes: Sequence[Tuple[int, int]], batches: Sequence[int], log: Callable[[str], None],
         reps: int = 30, v2_only: bool = False) -> List[dict]:
    """Fastest config (alpha = 1, 1 % ortho, the harder case) per (M, N, K).

    v2_only: candidates are the active table's config for that (M, N, K) (as is, no split
    sweep) and the v2 decode configs (``candidate_configs_v2``) with SPLIT in 1..16; the
    winner's E is stored as 0 (automatic)."""
    from libortho.kernels import dual_stream_linear
    from libortho.kernels.configs import select_config
    entries = []
    for n, k in shapes:
        nb = n * k // 2
        bases = base_layers(n, k, _copies(nb), seed=7)
        layers = [with_ortho(b, 0.01, seed=i) for i, b in enumerate(bases)]
        for m in batches:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in layers]
            best = None
            splits = (1, 2, 4, 8, 16) if m <= 2 else (1, 2, 4, 8)
            if v2_only:
                cur = select_config(m, n, k, 128)
                trials = [cur] + [dict(cfg, SPLIT=sp) for cfg in candidate_configs_v2(m)
                                  for sp in (1, 2, 4, 8, 16)]
            else:
                trials = [dict(cfg, SPLIT=sp) for cfg in candidate_configs(m) for sp in splits]
            cur_us = None
            for i, c in enumerate(trials):
                try:
                    r = time_calls([(lambda l=l, x=x, c=c: dual_stream_linear(x, l, 1.0,
                                                                              config=c))
                                    for l, x in zip(layers, xs)], reps=reps, warmup=3)
                except Exception as exc:
                    log(f"  config {c} failed: {exc!r}")
                    continue
                if v2_only and i == 0:
                    cur_us = r["us"]
                if best is None or r["us"] < best[0]:
                    best = (r["us"], c)
            if best:
                cfg = dict(best[1])
                if cfg["kernel"] == "gemv2":
                    cfg["E"] = 0
                entries.append(dict(m=m, n=n, k=k, config=cfg, us_alpha1_1pct=best[0]))
                if cur_us is not None:
                    entries[-1]["us_previous_entry"] = cur_us
                log(f"  tuned N={n} K={k} M={m}: {best[0]:.2f} us {best[1]}"
                    + (f" (previous entry {cur_us:.2f} us)" if cur_us is not None else ""))
        del bases, layers
        torch.cuda.empty_cache()
    return entries


# --------------------------------------------------------------------------- report
def goals(results: List[dict], copy_gbps: float) -> List[dict]:
    """Evaluate the kernel speed goals from the rows (batch 1 unless stated)."""
    t = {(r["row"], r["n"], r["k"], r["m"]): r for r in results}
    out = []

    def get(row, n, k, m):
        r = t.get((row, n, k, m))
        return r["us"] if r else None

    shapes = sorted({(r["n"], r["k"]) for r in results})
    for n, k in shapes:
        a0, a1 = get("a0", n, k, 1), get("a1_1", n, k, 1)
        i4, f16 = get("torch_int4", n, k, 1), get("fp16", n, k, 1)
        rows = get("a1_1_rows", n, k, 1)
        if a0 and a1:
            out.append(dict(goal="alpha1(1%) <= 1.10 x alpha0", n=n, k=k, m=1,
                            value=a1 / a0, met=a1 / a0 <= 1.10))
        if a0 and i4:
            out.append(dict(goal="alpha0 <= 0.8 x torch int4", n=n, k=k, m=1,
                            value=a0 / i4, met=a0 / i4 <= 0.8))
        if a0 and f16 and (n, k) == (8192, 8192):
            out.append(dict(goal="alpha0 >= 2.5x faster than fp16 (8192^2)", n=n, k=k, m=1,
                            value=f16 / a0, met=f16 / a0 >= 2.5))
        a1_16, f16_16 = get("a1_1", n, k, 16), get("fp16", n, k, 16)
        if a1_16 and f16_16:
            out.append(dict(goal="batch 16: alpha1(1%) faster than fp16", n=n, k=k, m=16,
                            value=f16_16 / a1_16, met=a1_16 < f16_16))
        if rows and a1:
            out.append(dict(goal="per-row alpha <= 1.03 x scalar alpha1", n=n, k=k, m=1,
                            value=rows / a1, met=rows / a1 <= 1.03))
        r0 = t.get(("a0", n, k, 1))
        if r0 and (n, k) == (8192, 8192) and copy_gbps:
            frac = r0["gbps"] / copy_gbps
            out.append(dict(goal=">= 70% of copy bandwidth (8192^2, alpha0)", n=n, k=k, m=1,
                            value=frac, met=frac >= 0.7))
    return out


def format_tables(results: List[dict], copy_gbps: float) -> str:
    """Markdown tables: µs per row, and GB/s (% of copy bandwidth) for the libortho rows."""
    rows_order = ["fp16", "torch_int4", "a0_base", "a1_1_base", "a0", "a1_0.5", "a1_1", "a1_2",
                  "a1_1_rows", "naive_1"]
    present = [r for r in rows_order if any(x["row"] == r for x in results)]
    keyed = {(x["row"], x["n"], x["k"], x["m"]): x for x in results}
    combos = sorted({(x["n"], x["k"], x["m"]) for x in results})
    lines = ["| N×K | M | " + " | ".join(present) + " |",
             "|---|---|" + "---|" * len(present)]
    for n, k, m in combos:
        cells = []
        for r in present:
            x = keyed.get((r, n, k, m))
            cells.append(f"{x['us']:.1f}" if x else "–")
        lines.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + " |")
    lines += ["", f"GB/s (share of the measured copy bandwidth {copy_gbps:.0f} GB/s):", "",
              "| N×K | M | " + " | ".join(present) + " |",
              "|---|---|" + "---|" * len(present)]
    for n, k, m in combos:
        cells = []
        for r in present:
            x = keyed.get((r, n, k, m))
            cells.append(f"{x['gbps']:.0f} ({100 * x['gbps'] / copy_gbps:.0f}%)"
                         if x and x.get("gbps") else "–")
        lines.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> Dict[str, Any]:
    """Card, versions and date for the report."""
    import triton
    p = torch.cuda.get_device_properties(0)
    return dict(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2 ** 30, 1), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# --------------------------------------------------------------------------- CLI
def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, k = part.lower().split("x")
        out.append((int(n), int(k)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``libortho bench``."""
    parser.add_argument("--json", default=None, help="write all rows, goals and the "
                        "environment to this JSON file")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="comma-separated OUTxIN layer shapes (default: the six benchmark shapes)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="comma-separated token-row counts (default 1,4,16,64)")
    parser.add_argument("--reps", type=int, default=100, help="timed graph replays (>= 100)")
    parser.add_argument("--rows", default="fp16,torch_int4,a0,a1,a1_1_rows,naive_1",
                        help="which rows to run")
    parser.add_argument("--tune", action="store_true",
                        help="sweep tile configs per shape first and use the fastest")
    parser.add_argument("--tune-extra-shapes", default="",
                        help="with --tune: more OUTxIN shapes to tune (not benchmarked), "
                        "e.g. the fused qkv/gate_up shapes of the end-to-end model")
    parser.add_argument("--save-configs", default=None,
                        help="with --tune: write the tuned table (JSON) here")
    parser.add_argument("--configs", default=None, help="load a tuned config table (JSON)")
    parser.add_argument("--tune-v2", action="store_true",
                        help="with --tune: only race the v2 decode kernel (M <= 16) against "
                        "the loaded table's entries; other M keep the table's entries")
    parser.add_argument("--tune-batches", default=None,
                        help="with --tune: token-row counts to tune (default: --batches)")
    parser.add_argument("--tune-only", action="store_true",
                        help="with --tune: stop after tuning (and --save-configs)")
    parser.add_argument("--baseline-configs", default=None,
                        help="a second config table: adds rows a0_base / a1_1_base timed with "
                        "it (before/after in one run on one card)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints tables and goals, returns a process exit code."""
    if not torch.cuda.is_available():
        print("libortho bench needs a CUDA GPU", file=sys.stderr)
        return 2
    from libortho.kernels import available, configs
    if not available():
        print("libortho bench needs Triton (pip install triton)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = _parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",")]
    rows_wanted = args.rows.split(",")
    env = environment()
    print(f"device: {env['device']} ({env['sms']} SMs), torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)

    def log(s: str) -> None:
        print(s, flush=True)

    if args.configs:
        configs.load_table(args.configs)
    tuned = None
    if args.tune:
        log("tuning ...")
        extra = _parse_shapes(args.tune_extra_shapes) if args.tune_extra_shapes else []
        tb = [int(b) for b in args.tune_batches.split(",")] if args.tune_batches else batches
        tuned = tune(shapes + [s for s in extra if s not in shapes], tb, log,
                     v2_only=args.tune_v2)
        note = ("fastest of libortho.bench.candidate_configs at alpha=1, 1% ortho, fp16, g=128"
                if not args.tune_v2 else
                "M in %s: fastest of the previous entry and libortho.bench.candidate_configs_v2 "
                "(alpha=1, 1%% ortho, fp16, g=128); other M: previous table" % tb)
        info = dict(device=env["device"], torch=env["torch"], triton=env["triton"],
                    date=env["date"], note=note)
        if args.tune_v2:  # keep the previous entries of every (M, N, K) not re-tuned
            done = {(e["m"], e["n"], e["k"]) for e in tuned}
            for (n_, k_), rows in configs.TABLE.items():
                for m_, c_ in rows:
                    if (m_, n_, k_) not in done:
                        tuned.append(dict(m=m_, n=n_, k=k_, config=c_))
            tuned.sort(key=lambda e: (e["n"], e["k"], e["m"]))
        configs.set_table(tuned, info)
        if args.save_configs:
            configs.save_table(args.save_configs, tuned, info)
        if args.tune_only:
            return 0
    baseline = configs.read_table(args.baseline_configs) if args.baseline_configs else None
    bw = copy_bandwidth()
    log(f"copy bandwidth: {bw:.0f} GB/s (read + write)")
    results: List[dict] = []
    for n, k in shapes:
        results += bench_shape(n, k, batches, max(100, args.reps), DENSITIES, rows_wanted, log,
                               baseline)
        if args.json:  # partial results survive a timeout
            with open(args.json, "w") as f:
                json.dump(dict(env=env, copy_gbps=bw, results=results, tuned=tuned,
                               partial=True), f, indent=1)
    g = goals(results, bw)
    table = format_tables(results, bw)
    print("\n" + table + "\n")
    for x in g:
        print(f"{'MET ' if x['met'] else 'MISS'} {x['goal']:45s} N={x['n']} K={x['k']} "
              f"M={x['m']}: {x['value']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gbps=bw, results=results, goals=g, tuned=tuned,
                           table_md=table), f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="libortho bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
