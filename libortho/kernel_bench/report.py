"""The benchmark report: speed goals evaluated from the rows, markdown tables, and the card
and versions the numbers come from."""
from __future__ import annotations

import datetime
from typing import Any, Dict, List

import torch


def goals(results: List[dict], copy_gbps: float) -> List[dict]:
    """Evaluate the kernel speed goals from the rows (batch 1 unless stated)."""
    results = [r for r in results if "us" in r]  # rows that failed carry "error" instead
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
        a0_4, i4_4 = get("a0", n, k, 4), get("torch_int4", n, k, 4)
        if a0_4 and i4_4:
            out.append(dict(goal="batch 4: alpha0 faster than torch int4", n=n, k=k, m=4,
                            value=i4_4 / a0_4, met=a0_4 < i4_4))
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
