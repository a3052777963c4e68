"""The layer benchmark: every row (fp16, torch INT4, libortho alpha 0/1, per-row alpha,
naive sparse) for one layer shape at several token-row counts."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .operands import _copies, base_layers, int4pack, layer_bytes, with_ortho
from .timing import time_calls

SHAPES: List[Tuple[int, int]] = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096),
                                 (4096, 14336), (8192, 8192)]
BATCHES: List[int] = [1, 4, 16, 64]
DENSITIES: List[float] = [0.005, 0.01, 0.02]


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
