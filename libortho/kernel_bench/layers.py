"""The layer benchmark: every row (fp16, torch INT4, libortho alpha 0/1, per-row alpha,
naive sparse) for one layer shape at several token-row counts."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .operands import _copies, base_layers, int4pack, layer_bytes, with_lowrank, with_ortho
from .timing import time_calls

SHAPES: List[Tuple[int, int]] = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096),
                                 (4096, 14336), (8192, 8192)]
BATCHES: List[int] = [1, 2, 4, 8, 16, 32, 64]
DENSITIES: List[float] = [0.005, 0.01, 0.02]
LR_RANK = 64  # rank of the low-rank part in the a1_lr rows (next to 1 % sparse)
PREV_ROWS = ("a0_prev", "a1_1_prev", "a1_2_prev", "a1_lr_prev")


def _prev_path(fn):
    """fn run with kernel v3 switched off (dispatch.V3_ENABLED): the previous kernels and
    table, timed in the same process on the same layers. The dispatch decision is taken
    when the graph is captured, so the switch only has to hold during the call."""
    from libortho.kernels import dispatch

    def call():
        old = dispatch.V3_ENABLED
        dispatch.V3_ENABLED = False
        try:
            return fn()
        finally:
            dispatch.V3_ENABLED = old
    return call


def split_for_shape(n: int, k: int, ortho_budget: float, lowrank_share: float,
                    group_size: int = 128, lowrank_bits: int = 16) -> Tuple[float, int]:
    """(sparse density, rank) of one [n, k] layer whose ortho stream takes ``ortho_budget`` of its
    INT4 base's bytes, ``lowrank_share`` of them the low-rank part's (as ortho_split.split_budget
    splits a model with per-layer ranks), L stored at ``lowrank_bits`` (16: fp16 factors, 8 or 4: codes)."""
    from libortho.lowrank import rank_bytes, rank_for_bytes
    from libortho.ortho_split import SPARSE_ENTRY_BYTES, base_bytes
    budget = ortho_budget * base_bytes((n, k), 4, group_size) - 4 * (n + 1)
    rank = rank_for_bytes(n, k, int(lowrank_share * max(0.0, budget)), lowrank_bits)
    left = 0.0 if lowrank_share == 1.0 else budget - rank * rank_bytes(n, k, lowrank_bits)
    return max(0.0, left) / SPARSE_ENTRY_BYTES / (n * k), rank


def bench_shape(n: int, k: int, batches: Sequence[int], reps: int, densities: Sequence[float],
                rows_wanted: Sequence[str], log: Callable[[str], None],
                baseline: Optional[dict] = None, split: Optional[Tuple[float, int]] = None,
                lowrank_bits: int = 16) -> List[dict]:
    """All rows for one layer shape at the given token-row counts. ``baseline``: a second
    config table (``configs.read_table``); adds rows ``a0_base`` / ``a1_1_base`` that run
    the same layers with that table's configs (before/after on one card in one run).
    ``split``: (sparse density, rank) of a two-part ortho stream; adds rows ``a0_split`` and
    ``a1_split`` that run OrthoLinear itself (the fused kernel, then the low-rank part: two thin
    GEMMs on fp16 factors, or kernels.lowrank_codes on ``lowrank_bits`` 8 / 4 codes) at alpha 0 and 1.
    ``a1_lr``: alpha 1, 1 % sparse plus a rank-``LR_RANK`` part through
    ``dual_stream_linear(..., lowrank=True)`` (fused into kernel v3 for 2 <= M <= 64).
    ``*_prev`` rows (``PREV_ROWS``, M >= 2): the same calls with kernel v3 switched off (the
    previous kernels; ``a1_lr_prev`` adds the low-rank part with two thin GEMMs after them)."""
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
    want_lr = "a1_lr" in rows_wanted or "a1_lr_prev" in rows_wanted
    lr_layers = ([with_lowrank(l, LR_RANK, seed=30_000 + i) for i, l in enumerate(dens_layers[d1])]
                 if want_lr else [])
    split_layers = _split_layers(bases, *split, lowrank_bits) if split else []
    csr = []
    if "naive_1" in rows_wanted:
        for lay in dens_layers[d1]:
            csr.append(torch.sparse_csr_tensor(lay.ortho_crow, lay.ortho_col, lay.ortho_val,
                                               size=(n, k)))
    for m in batches:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(nl)]
        rowa = torch.rand(m, device="cuda")

        def add(row: str, calls, nbytes: Optional[int], extra: Optional[dict] = None):
            try:
                r = time_calls(calls, reps=reps)
            except Exception as exc:  # e.g. a Triton compile error: log it, keep going
                log(f"  N={n:5d} K={k:5d} M={m:3d} {row:12s} FAILED {exc!r}"[:2000])
                results.append(dict(row=row, n=n, k=k, m=m, error=repr(exc)[:2000]))
                return
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
        lr_bytes = 2 * LR_RANK * (n + k)
        if "a1_lr" in rows_wanted:
            add("a1_lr", [(lambda l=l, x=x: dual_stream_linear(x, l, 1.0, lowrank=True))
                          for l, x in zip(lr_layers, xs)],
                layer_bytes(lr_layers[0], m, True) + lr_bytes,
                dict(nnz=int(lr_layers[0].ortho_col.numel()), rank=LR_RANK))
        if m >= 2:  # batch 1 takes the same path with v3 on or off
            if "a0_prev" in rows_wanted:
                add("a0_prev", [_prev_path(lambda l=l, x=x: dual_stream_linear(x, l, 0.0))
                                for l, x in zip(bases, xs)], layer_bytes(bases[0], m, False))
            for d in (0.01, 0.02):
                name = f"a1_{d * 100:g}_prev"
                if name in rows_wanted and d in dens_layers:
                    ls = dens_layers[d]
                    add(name, [_prev_path(lambda l=l, x=x: dual_stream_linear(x, l, 1.0))
                               for l, x in zip(ls, xs)], layer_bytes(ls[0], m, True),
                        dict(nnz=int(ls[0].ortho_col.numel())))
            if "a1_lr_prev" in rows_wanted:
                add("a1_lr_prev", [_prev_path(lambda l=l, x=x: dual_stream_linear(
                    x, l, 1.0, lowrank=True)) for l, x in zip(lr_layers, xs)],
                    layer_bytes(lr_layers[0], m, True) + lr_bytes,
                    dict(nnz=int(lr_layers[0].ortho_col.numel()), rank=LR_RANK))
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
        if split_layers:
            lay0 = split_layers[0]
            from libortho.lowrank import rank_bytes
            extra = dict(nnz=int(lay0.ortho_col.numel()), rank=split[1], lowrank_bits=lowrank_bits)
            lowrank_bytes = split[1] * rank_bytes(n, k, lowrank_bits)
            for a in (0.0, 1.0):
                for lay in split_layers:
                    lay.alpha_state.default = a
                add(f"a{a:g}_split", [(lambda l=l, x=x: l(x)) for l, x in zip(split_layers, xs)],
                    layer_bytes(lay0, m, a > 0) + (lowrank_bytes if a > 0 else 0), extra)
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
    del bases, dens_layers, w16, i4, csr, split_layers, lr_layers
    torch.cuda.empty_cache()
    return results


def _split_layers(bases: list, density: float, rank: int, lowrank_bits: int = 16) -> list:
    """OrthoLinear copies of ``bases`` with a Bernoulli(density) sparse part and a random rank-``rank`` part
    (fp16 factors at ``lowrank_bits`` 16, else random codes of that width)."""
    from libortho.kernels import prepare
    from libortho.kernels.synthetic import as_ortholinear, with_coded_lowrank
    out = []
    for i, b in enumerate(bases):
        sparse = with_ortho(b, density, seed=20_000 + i)
        if lowrank_bits != 16 and rank:
            layer = with_coded_lowrank(sparse, rank, lowrank_bits, seed=10_000 + i)
        else:
            gen = torch.Generator(device="cuda").manual_seed(10_000 + i)
            B = (torch.randn(b.out_features, rank, generator=gen, device="cuda") * 0.02).half()
            A = (torch.randn(rank, b.in_features, generator=gen, device="cuda") * 0.02).half()
            layer = as_ortholinear(sparse, lowrank=(B, A) if rank else None)
        prepare(layer)
        out.append(layer)
    return out
