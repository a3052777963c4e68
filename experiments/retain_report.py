"""Table of the retain screen (experiments/retain_calibration.py): alpha-0 audit rows of the artifacts
decomposed with look-alikes on the public side and with the control text, per seed and as the mean (min-max).

    python experiments/retain_report.py /tmp/ret/seed0 /tmp/ret/seed1 /tmp/ret/seed2 --json docs/membership/retain_cpu.json

Each SEED_DIR holds audit_retain/report.json and audit_control/report.json (libortho audit --out).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTACKS = ("loss", "zlib", "min_k", "ref")
VARIANTS = ("retain", "control")


def audit_row(report_path: Path) -> dict:
    row = json.loads(report_path.read_text())["rows"][0]
    out = {"perplexity": row["perplexity"], "extraction": row["extraction_rate"],
           **{f"exposure k={k}": v for k, v in row["exposure_by_k"].items()}}
    for attack in ATTACKS:
        m = row["mia"][attack]
        out[f"{attack} AUC"] = m["auc"]
        out[f"{attack} AUC CI"] = m["auc_ci"]
    out["TPR ref @ lowest FPR"] = row["mia"]["ref"]["tpr_at_lowest_fpr"]
    return out


def spread(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed_dirs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = {d.name: {v: audit_row(d / f"audit_{v}" / "report.json") for v in VARIANTS} for d in args.seed_dirs}
    columns = ["perplexity", "exposure k=16", "loss AUC", "zlib AUC", "min_k AUC", "ref AUC", "TPR ref @ lowest FPR"]
    print("| variant | seed | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for v in VARIANTS:
        for seed, by_variant in rows.items():
            print(f"| {v} | {seed} | " + " | ".join(f"{by_variant[v][c]:.3f}" for c in columns) + " |")
        print(f"| **{v}** | mean | " + " | ".join(spread([r[v][c] for r in rows.values()]) for c in columns) + " |")
    deltas = [r["retain"]["ref AUC"] - r["control"]["ref AUC"] for r in rows.values()]
    print(f"\nP-calibrated AUC, retain minus control, per seed: {', '.join(f'{d:+.3f}' for d in deltas)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
