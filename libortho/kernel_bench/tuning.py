"""Tile-config tuning: the candidate configs per token-row count and the sweep that keeps the
fastest per (M, N, K) (alpha = 1, 1 % ortho; the tc race also at alpha = 0)."""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .operands import _copies, base_layers, with_ortho
from .timing import time_calls


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


def candidate_configs_tc(m: int) -> List[dict]:
    """Kernel v3 (tc.py) configs raced per token-row count (2 <= m <= 64): BN, warps, cp.async
    stages and the split factor (0 = automatic from the SM count). BM follows m (16 padded up
    to 16 rows, else 32 / 64: one M tile). E = 0: entries per K iteration from the density."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    c = []
    for bn, w, st, sp in ((64, 4, 3, 0), (128, 4, 3, 0), (64, 4, 4, 0), (128, 8, 3, 0),
                          (64, 4, 4, 8), (128, 4, 3, 8)):
        c.append(dict(kernel="tc", BM=bm, BN=bn, BK=128, num_warps=w, STAGES=st, E=0,
                      SPLIT=sp, XT=True))
    return c


def tc_trials(m: int, n: int, k: int) -> List[dict]:
    """Trials of one (m, n, k) in ``tune_tc``: the previous path's config (the table of
    configs.py, what v3-off runs) first, then ``candidate_configs_tc``."""
    from libortho.kernels.configs import select_config
    return [select_config(m, n, k, 128)] + candidate_configs_tc(m)


def tune_tc(shapes: Sequence[Tuple[int, int]], batches: Sequence[int], log: Callable[[str], None],
            reps: int = 20, budget_s: Optional[float] = None, density: float = 0.01) -> List[dict]:
    """The tc table (configs.TC_TABLE format): per (M, N, K) with 2 <= M <= 64, the fastest of
    ``tc_trials`` at alpha = 1 with ``density`` ortho (fp16, g = 128) as ``config``, and the
    fastest at alpha = 0 (the base-only kernels, what a public deployment runs) as
    ``config_base_only``. The previous path's config stays the entry where it wins, so the
    table never makes a shape slower than v3-off (as timed here). ``budget_s``: stop starting
    new (M, N, K) after this many seconds (the entries not tuned fall back to
    configs.default_tc_config)."""
    t_end = None if budget_s is None else time.time() + budget_s
    entries = []
    for n, k in shapes:
        bases = base_layers(n, k, _copies(n * k // 2), seed=7)
        layers = [with_ortho(b, density, seed=i) for i, b in enumerate(bases)]
        for m in batches:
            if not 2 <= m <= 64:
                continue
            if t_end is not None and time.time() > t_end:
                log(f"  tune_tc: budget spent, N={n} K={k} M={m} not tuned")
                continue
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in layers]
            best, times = _race_tc(layers, xs, tc_trials(m, n, k), 1.0, reps, log)
            if best is None:
                continue
            best0, times0 = _race_tc(layers, xs, tc_trials(m, n, k), 0.0, reps, log)
            entries.append(dict(m=m, n=n, k=k, config=dict(best[1]), us_alpha1=best[0], trials=times,
                                **(dict(config_base_only=dict(best0[1]), us_alpha0=best0[0], trials_alpha0=times0)
                                   if best0 else {})))
            prev = times[0]["us"] if times[0]["config"]["kernel"] != "tc" else float("nan")
            log(f"  tuned tc N={n} K={k} M={m}: {best[0]:.2f} us {best[1]} (previous path {prev:.2f} us)"
                + (f"; alpha 0: {best0[0]:.2f} us {best0[1]['kernel']}" if best0 else ""))
        del bases, layers
        torch.cuda.empty_cache()
    return entries


def _race_tc(layers, xs, trials: List[dict], alpha: float, reps: int,
             log: Callable[[str], None]) -> Tuple[Optional[Tuple[float, dict]], List[dict]]:
    """((µs, config) of the fastest trial at ``alpha`` or None, [{"config", "us"}, ...])."""
    from libortho.kernels import dispatch, dual_stream_linear
    best, times = None, []
    for c in trials:
        old = dispatch.V3_ENABLED
        dispatch.V3_ENABLED = c["kernel"] == "tc"
        try:
            r = time_calls([(lambda l=l, x=x, c=c: dual_stream_linear(x, l, alpha, config=c))
                            for l, x in zip(layers, xs)], reps=reps, warmup=3)
        except Exception as exc:
            log(f"  config {c} failed at alpha {alpha:g}: {exc!r}"[:2000])
            continue
        finally:
            dispatch.V3_ENABLED = old
        times.append(dict(config=c, us=r["us"]))
        if best is None or r["us"] < best[0]:
            best = (r["us"], c)
    return best, times
