"""The forget objective's curve over lam at alpha 0, from forget_eval.py rows: perplexity and the
membership attacks' AUC against lam, records and look-alike mode, beside the quantized reference
and the public-text control.

    python experiments/forget_eval.py --preset default --seeds 0 --threads 1 --alphas 0 \
        --only "records, lam 10" "records, lam 30" "records, lam 100" "control, lam 30" \
               "lookalikes, lam 10" "lookalikes, lam 30" "lookalikes, lam 100" --out lam.json
    python experiments/lam_curve_report.py lam.json [more.json ...] --seed 0 --plot docs/forget_lam/lam_curve.png

The preset's own lam (3) is read from the rows named "records" and "lookalikes" of any file given.
AUC intervals: Hanley & McNeil's standard error (members and non-members counted from the rows),
±1.96 SE; they say how far one seed can be trusted, not how the seeds spread.
"""
from __future__ import annotations

import argparse
import json
import math
import re

PRESET_LAM = 3.0
ATTACKS = ("loss", "zlib", "min_k", "ref")


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC from n_pos positives and n_neg negatives (Hanley & McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def alpha0_row(variant: dict) -> dict:
    rows = variant["rows"] if "rows" in variant else [variant]
    return next(r for r in rows if r.get("alpha") in (0.0, None))


def curve_points(files: list[str], seed: str) -> dict[str, dict[float, dict]]:
    """{mode: {lam: alpha-0 row}} for records and look-alike mode, plus the references."""
    points: dict[str, dict[float, dict]] = {"records": {}, "lookalikes": {}, "control": {}, "quantized reference": {}}
    for path in files:
        rows = json.load(open(path))[seed]
        for name, variant in rows.items():
            if name == "quantized reference":
                points[name][0.0] = variant
                continue
            m = re.fullmatch(r"(records|lookalikes|control), lam ([\d.]+)", name)
            if m:
                points[m.group(1)][float(m.group(2))] = alpha0_row(variant)
            elif name in ("records", "lookalikes"):
                points[name][PRESET_LAM] = alpha0_row(variant)
            elif name == "control (public text as X_priv)":
                points["control"][PRESET_LAM] = alpha0_row(variant)
    return points


def table(points: dict[str, dict[float, dict]], n_members: int, n_nonmembers: int) -> str:
    lines = ["| mode | lam | PPL | exposure k=1 / 4 / 16 | loss AUC | zlib AUC | Min-K% AUC | P-calibrated AUC (±1.96 SE) | TPR ref @ FPR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, by_lam in points.items():
        for lam in sorted(by_lam):
            r = by_lam[lam]
            e, auc = r["measured_exposure_by_k"], r["auc"]
            se = hanley_mcneil_se(auc["ref"], n_members, n_nonmembers)
            tpr, fpr = r["tpr_at_lowest_fpr"]["ref"]
            lam_text = "–" if mode == "quantized reference" else f"{lam:g}"
            lines.append(f"| {mode} | {lam_text} | {r['perplexity']:.2f} | {e['1']:.2f} / {e['4']:.2f} / {e['16']:.2f} | "
                         f"{auc['loss']:.3f} | {auc['zlib']:.3f} | {auc['min_k']:.3f} | {auc['ref']:.3f} ± {1.96 * se:.3f} | "
                         f"{tpr:.3f} @ {fpr:.3f} |")
    return "\n".join(lines)


def plot(points: dict[str, dict[float, dict]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_auc, ax_ppl) = plt.subplots(1, 2, figsize=(10, 5.2))
    ref_q = points["quantized reference"].get(0.0)
    for mode, style in (("records", "o-"), ("lookalikes", "s--")):
        lams = sorted(points[mode])
        if not lams:
            continue
        for attack, color in (("ref", "C3"), ("loss", "C0")):
            ax_auc.plot(lams, [points[mode][l]["auc"][attack] for l in lams], style, color=color, label=f"{mode}, {attack} AUC")
        ax_ppl.plot(lams, [points[mode][l]["perplexity"] for l in lams], style, label=mode)
    control = sorted(points["control"])
    if control:
        ax_auc.plot(control, [points["control"][l]["auc"]["ref"] for l in control], "x:", color="C3", markersize=9,
                    label="control (public text), ref AUC")
        ax_ppl.plot(control, [points["control"][l]["perplexity"] for l in control], "x:", color="k", markersize=9,
                    label="control (public text)")
    ax_auc.axhline(0.55, color="grey", linestyle=":", label="goal 0.55")
    if ref_q:
        ax_auc.axhline(ref_q["auc"]["ref"], color="C2", linestyle="-.", label="quantized reference, ref AUC")
        ax_ppl.axhline(ref_q["perplexity"], color="C2", linestyle="-.", label="quantized reference")
    for ax, ylabel in ((ax_auc, "AUC at alpha 0"), (ax_ppl, "perplexity at alpha 0")):
        ax.set_xscale("log")
        ax.set_xlabel("lam (relative to the traces)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--members", type=int, default=48, help="members the AUCs were computed on")
    ap.add_argument("--nonmembers", type=int, default=48, help="non-members the AUCs were computed on")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    points = curve_points(args.files, args.seed)
    print(table(points, args.members, args.nonmembers))
    if args.plot:
        plot(points, args.plot)


if __name__ == "__main__":
    main()
