"""The benchmark report: speed goals evaluated from the rows, markdown tables, and the card
and versions the numbers come from."""
from __future__ import annotations

import datetime
from typing import Any, Dict, List

import torch


GOALS = (
    "batch 1: alpha 0 >= 70 % of copy bandwidth (8192²)",
    "batch 1: alpha 1 (1 %) <= 1.05 x (1 + ortho/base bytes) x alpha 0",
    "batch 4: alpha 0 <= 0.8 x torch int4",
    "batch 16: alpha 1 (1 %) >= 2x faster than fp16",
    "batch 64: alpha 1 (1 %) no slower than fp16",
    "per-row alpha <= 1.03 x scalar alpha 1",
)


def goals(results: List[dict], copy_gbps: float) -> List[dict]:
    """Evaluate the kernel speed goals (``GOALS``, H200) from the rows.

    Each goal is one dict per shape (and per M for the per-row alpha goal): ``goal``, ``n``,
    ``k``, ``m``, ``value`` (the measured ratio), ``limit`` and ``cmp`` ("<=" / ">=": met when
    value cmp limit), ``met``. Ratios:

    * 70 % of copy bandwidth: a0's GB/s (bytes it must move / time) / the copy bandwidth.
    * alpha 1 vs alpha 0: a1_1 / a0 at M = 1, limit 1.05 × bytes(a1_1) / bytes(a0): the
      time the extra ortho bytes (row pointers, columns, values) would cost at a0's
      bandwidth, plus 5 %.
    * torch int4: a0 / torch_int4 at M = 4.
    * fp16 at M = 16: fp16 / a1_1 (speed-up); at M = 64: a1_1 / fp16.
    * per-row alpha: a1_1_rows / a1_1 at every M measured.
    """
    results = [r for r in results if "us" in r]  # rows that failed carry "error" instead
    t = {(r["row"], r["n"], r["k"], r["m"]): r for r in results}
    out = []

    def add(goal, n, k, m, value, limit, cmp):
        met = value <= limit if cmp == "<=" else value >= limit
        out.append(dict(goal=goal, n=n, k=k, m=m, value=value, limit=limit, cmp=cmp, met=met))

    def us(row, n, k, m):
        r = t.get((row, n, k, m))
        return r["us"] if r else None

    shapes = sorted({(r["n"], r["k"]) for r in results})
    for n, k in shapes:
        r0 = t.get(("a0", n, k, 1))
        if r0 and r0.get("gbps") and (n, k) == (8192, 8192) and copy_gbps:
            add(GOALS[0], n, k, 1, r0["gbps"] / copy_gbps, 0.70, ">=")
        r1 = t.get(("a1_1", n, k, 1))
        if r0 and r1:
            lim = 1.05 * (r1["bytes"] / r0["bytes"] if r0.get("bytes") and r1.get("bytes")
                          else 1.0)
            add(GOALS[1], n, k, 1, r1["us"] / r0["us"], lim, "<=")
        a0_4, i4_4 = us("a0", n, k, 4), us("torch_int4", n, k, 4)
        if a0_4 and i4_4:
            add(GOALS[2], n, k, 4, a0_4 / i4_4, 0.8, "<=")
        a1_16, f16_16 = us("a1_1", n, k, 16), us("fp16", n, k, 16)
        if a1_16 and f16_16:
            add(GOALS[3], n, k, 16, f16_16 / a1_16, 2.0, ">=")
        a1_64, f16_64 = us("a1_1", n, k, 64), us("fp16", n, k, 64)
        if a1_64 and f16_64:
            add(GOALS[4], n, k, 64, a1_64 / f16_64, 1.0, "<=")
        for m in sorted({r["m"] for r in results if (r["n"], r["k"]) == (n, k)}):
            rows, a1 = us("a1_1_rows", n, k, m), us("a1_1", n, k, m)
            if rows and a1:
                add(GOALS[5], n, k, m, rows / a1, 1.03, "<=")
    return out


def format_tables(results: List[dict], copy_gbps: float) -> str:
    """Markdown tables: µs per row, and GB/s (% of copy bandwidth) for the libortho rows."""
    results = [r for r in results if "us" in r]
    rows_order = ["fp16", "torch_int4", "a0_base", "a1_1_base", "a0_prev", "a0", "a1_0.5",
                  "a1_1_prev", "a1_1", "a1_2_prev", "a1_2", "a1_lr_prev", "a1_lr",
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
