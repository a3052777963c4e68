"""Tile configurations per shape: a table kept in the repo, filled by GPU sweeps.

A config is a dict with keys:
  kernel: "gemv" | "gemv2" | "gemm"; BM, BN, BK (gemv2: GPT groups per K tile instead of
  BK, STAGES = 1 for register prefetch or > 1 for Triton's cp.async pipeline, XVEC, H2);
  num_warps, num_stages (gemv: unused, it prefetches by hand); E (ortho chunk, 0 = from
  the layer's density: entries per row per step in gemv / rows mode, entries per tile per
  step in tile mode); SWAP, JOIN, ORTHO ("rows" |
  "tile" | "auto": per-row gathers for few token rows, one-hot tl.dot scatter otherwise;
  gemm only);
  SPLIT (split-K factor, 0 = automatic from the SM count).

``select_config(M, N, K, group_size)`` looks up the table by (N, K) and the smallest tuned
row count ≥ M (else the largest), falling back to the heuristics below. The table lives in
``tuned_configs.json`` next to this file, written by ``libortho bench --tune --save-configs``
(the card it was tuned on is recorded in the file and in docs/kernel_notes.md).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Tuple

Config = Dict[str, object]

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")
# The active table, owned by this module: (N, K) -> sorted list of (tuned rows M, config).
# Lifetime: empty until the first lookup, which reads TABLE_PATH once (not at import); it lives
# for the process unless `load_table` or `set_table` replace it.
TABLE: Dict[Tuple[int, int], List[Tuple[int, Config]]] = {}
TABLE_INFO: Dict[str, object] = {}
_table_read = False


def m_bucket(m: int) -> int:
    """Round the number of token rows up to a power of two (1, 2, 4, ..., 256)."""
    b = 1
    while b < m and b < 256:
        b *= 2
    return b


def default_config(m: int, n: int, k: int, group_size: int, v2: bool = True) -> Config:
    """Heuristic config when the table has no entry (SPLIT 0 = choose from the SM count).
    v2: the v2 decode kernel for m <= 4 (the caller falls back with v2=False for layouts it
    does not take: see libortho.kernels.dispatch._v2_supported)."""
    if v2 and m <= 4:
        if m == 1:
            return dict(kernel="gemv2", BM=1, BN=64, GPT=1, num_warps=2, num_stages=1,
                        STAGES=1, E=0, SPLIT=0)
        return dict(kernel="gemv2", BM=2 if m == 2 else 4, BN=32, GPT=1, num_warps=2,
                    num_stages=1, STAGES=3, E=0, SPLIT=0)
    if m <= 2:
        return dict(kernel="gemv", BM=m_bucket(m), BN=64, BK=128, num_warps=2, num_stages=1,
                    E=0, SPLIT=0)
    if m <= 16:
        return dict(kernel="gemm", BM=16, BN=32, BK=128, num_warps=4, num_stages=4, E=0,
                    SWAP=True, JOIN=True, ORTHO="rows", SPLIT=0)
    if m <= 64:
        return dict(kernel="gemm", BM=64, BN=64, BK=128, num_warps=4, num_stages=4, E=0,
                    SWAP=False, JOIN=True, ORTHO="tile", SPLIT=0)
    return dict(kernel="gemm", BM=128, BN=128, BK=128, num_warps=8, num_stages=3, E=0,
                SWAP=False, JOIN=True, ORTHO="tile", SPLIT=0)


# ---- kernel v3 (tc.py): a separate small table per (M bucket, N, K) -------------------------
# Entries hold the fastest config of a tuning race for 2 <= M <= 64: a "tc" config, or the
# previous path's config when that won (libortho.kernel_bench.tune_tc); at alpha 1, and, where
# the race timed it, at alpha 0 (``config_base_only``: the base-only kernels win more often). Read only while v3 is
# on (the default; LIBORTHO_KERNEL_V3=0 or dispatch.set_v3(False) turns it off); kept apart from the
# table above so that with v3 off the old path is exactly as it was. The shipped file records
# the run it came from (``source``).
TC_TABLE_PATH = os.path.join(os.path.dirname(__file__), "tc_configs.json")
# (n, k) -> [(m bucket, config at alpha 1, config of the base-only race or None), ...]
TC_TABLE: Dict[Tuple[int, int], List[Tuple[int, Config, Optional[Config]]]] = {}
_tc_read = False
TC_MIN_M, TC_MAX_M = 2, 64


def default_tc_config(m: int) -> Config:
    """Heuristic tc config (no table entry): BM = 16 (tl.dot's minimum, padded) up to 16 token
    rows, else 32 / 64 (one M tile, so each weight is read once); E = 0: ortho entries per row
    per K iteration from the density; SPLIT = 0: from the SM count; XT: gather x from a
    transposed copy (only made when the ortho stream runs)."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    return dict(kernel="tc", BM=bm, BN=64, BK=128, num_warps=4, STAGES=3, E=0, SPLIT=0,
                XT=True)


def set_tc_table(entries: List[dict]) -> None:
    """Replace the tc table with ``entries`` = [{"m", "n", "k", "config"}, ...]."""
    global _tc_read
    _tc_read = True
    TC_TABLE.clear()
    for e in entries:
        base_only = e.get("config_base_only")
        TC_TABLE.setdefault((int(e["n"]), int(e["k"])), []).append(
            (int(e["m"]), dict(e["config"]), dict(base_only) if base_only else None))
    for rows in TC_TABLE.values():
        rows.sort(key=lambda r: r[0])


def load_tc_table(path: str = TC_TABLE_PATH) -> bool:
    """Load a tc table (same file format as ``save_table``); False if the file is missing."""
    global _tc_read
    _tc_read = True
    if not os.path.exists(path):
        TC_TABLE.clear()
        return False
    with open(path) as f:
        set_tc_table(json.load(f).get("entries", []))
    return True


def select_tc_config(m: int, n: int, k: int, group_size: int, base_only: bool = False) -> Optional[Config]:
    """Config for 2 <= m <= 64 under v3: the tc table's entry for the smallest tuned M bucket
    >= m of (n, k); with ``base_only`` (the call reads no ortho part: scalar alpha 0, or a
    layer without one) the entry's base-only winner where the race timed one. A shape the race
    never saw follows the race's verdict on the tuned shape nearest in weight count at that
    M: None (the previous path's own config) where the previous path won there, else
    ``default_tc_config``."""
    if not _tc_read:
        load_tc_table()
    tuned = TC_TABLE.get((n, k))
    if tuned is None and TC_TABLE:
        nearest = min(TC_TABLE, key=lambda nk: abs(math.log(nk[0] * nk[1] / (n * k))))
        winner = next((_winner(e, base_only) for e in TC_TABLE[nearest] if e[0] >= m), None)
        if winner is not None and winner.get("kernel") != "tc":
            return None
    for entry in tuned or []:
        if entry[0] >= m:
            return dict(_winner(entry, base_only))
    return default_tc_config(m)


def _winner(entry: Tuple[int, Config, Optional[Config]], base_only: bool) -> Config:
    """An entry's config for the call: the base-only race's winner when asked for and timed."""
    _, cfg, cfg_base_only = entry
    return cfg_base_only if base_only and cfg_base_only is not None else cfg


def set_table(entries: List[dict], info: Optional[Dict[str, object]] = None) -> None:
    """Replace the table with ``entries`` = [{"m", "n", "k", "config"}, ...]."""
    global _table_read
    _table_read = True
    TABLE.clear()
    TABLE_INFO.clear()
    TABLE_INFO.update(info or {})
    for e in entries:
        TABLE.setdefault((int(e["n"]), int(e["k"])), []).append((int(e["m"]), dict(e["config"])))
    for rows in TABLE.values():
        rows.sort(key=lambda r: r[0])


def load_table(path: str = TABLE_PATH) -> bool:
    """Load a table written by ``save_table``; False when the file does not exist."""
    global _table_read
    _table_read = True
    if not os.path.exists(path):
        return False
    with open(path) as f:
        data = json.load(f)
    set_table(data.get("entries", []), {k: v for k, v in data.items() if k != "entries"})
    return True


def save_table(path: str, entries: List[dict], info: Dict[str, object]) -> None:
    """Write entries (with timing fields if any) and info (device, versions, date)."""
    with open(path, "w") as f:
        json.dump(dict(info, entries=entries), f, indent=1)


def read_table(path: str) -> Dict[Tuple[int, int], List[Tuple[int, Config]]]:
    """A table file as a separate lookup dict (for ``select_config(..., table=...)``),
    leaving the active table alone (benchmarks compare two tables in one run)."""
    with open(path) as f:
        data = json.load(f)
    out: Dict[Tuple[int, int], List[Tuple[int, Config]]] = {}
    for e in data.get("entries", []):
        out.setdefault((int(e["n"]), int(e["k"])), []).append((int(e["m"]), dict(e["config"])))
    for rows in out.values():
        rows.sort(key=lambda r: r[0])
    return out


def select_config(m: int, n: int, k: int, group_size: int,
                  table: Optional[Dict[Tuple[int, int], List[Tuple[int, Config]]]] = None
                  ) -> Config:
    """Config for an [m, k] x [k, n] call: table entry if present, else the heuristic."""
    if table is None and not _table_read:
        load_table()
    rows = (TABLE if table is None else table).get((n, k))
    if rows:
        for tm, cfg in rows:
            if tm >= m:
                return dict(cfg)
        return dict(rows[-1][1])
    return default_config(m, n, k, group_size)
