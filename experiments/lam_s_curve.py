"""Alpha 1 against the private weight lam_s of L's fit (the privacy preset's propagated target): perplexity and
k = 4 exposure (as a share of FP's) per lam_s and mode, from forget_eval.py result files ({seed: {variant: ...}}),
with plain GPTQ's alpha 1 (the same L, no forget texts) as the bar. Variants are read by name: "records, lam_s W",
"lookalikes, lam_s W", and "records" / "lookalikes" / "... propagated L" as lam_s = `--preset-lam-s`.

    python experiments/lam_s_curve.py docs/lowrank_codes/lam_s_propagated_cpu.json docs/lowrank_codes/propagated_cpu_seed*.json \
        --plot docs/lowrank_codes/lam_s_curve_cpu.png
"""
from __future__ import annotations

import argparse
import json
import re
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def collect(paths: list[str], preset_lam_s: float) -> tuple[dict, dict]:
    """({seed: FP summary}, {(mode, lam_s or None for plain GPTQ): {seed: alpha-1 row}})."""
    fp, rows = {}, {}
    for path in paths:
        with open(path) as f:
            runs = json.load(f)
        for seed, variants in runs.items():
            for name, v in variants.items():
                if name == "baselines":
                    fp[seed] = v["fp"]
                    continue
                m = re.fullmatch(r"(records|lookalikes)(?:, lam_s ([\d.]+)|, propagated L)?", name)
                key = ("plain GPTQ", None) if name == "plain GPTQ, propagated L" else (
                    (m.group(1), float(m.group(2)) if m.group(2) else preset_lam_s) if m else None)
                if key is not None:
                    rows.setdefault(key, {})[seed] = next(r for r in v["rows"] if r["alpha"] == 1)
    return fp, rows


def table(fp: dict, rows: dict, only_seed: str | None = None) -> list[dict]:
    """Per (mode, lam_s): means over the seeds it has (or over `only_seed` alone), each as a share of FP's."""
    out = []
    for (mode, lam_s), by_seed in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        seeds = sorted(by_seed) if only_seed is None else [s for s in by_seed if s == only_seed]
        if not seeds:
            continue
        fp4 = statistics.mean(fp[s]["measured_exposure_by_k"]["4"] for s in seeds)
        fpx = statistics.mean(fp[s]["extraction_by_k"]["16"] for s in seeds)
        fpp = statistics.mean(fp[s]["perplexity"] for s in seeds)
        picked = [by_seed[s] for s in seeds]
        fp16 = statistics.mean(fp[s]["measured_exposure_by_k"]["16"] for s in seeds)
        out.append(dict(mode=mode, lam_s=lam_s, seeds=seeds, fp_ppl=fpp,
                        ppl=statistics.mean(r["perplexity"] for r in picked),
                        k4=statistics.mean(r["measured_exposure_by_k"]["4"] for r in picked) / fp4,
                        k16=statistics.mean(r["measured_exposure_by_k"]["16"] for r in picked) / fp16,
                        extraction=statistics.mean(r["extraction_by_k"]["16"] for r in picked) / fpx))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--preset-lam-s", type=float, default=30.0, help="lam_s of the rows named without one")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    fp, rows = collect(args.files, args.preset_lam_s)
    lines = table(fp, rows)
    print("| mode | lam_s | seeds | PPL (× FP) | exposure k=4 (of FP) | k=16 | greedy extraction k=16 (of FP) |")
    print("|---|---|---|---|---|---|---|")
    for r in lines:
        lam_s = "–" if r["lam_s"] is None else f"{r['lam_s']:g}"
        print(f"| {r['mode']} | {lam_s} | {','.join(r['seeds'])} | "
              f"{r['ppl']:.3f} ({r['ppl'] / r['fp_ppl']:.3f}×) | {r['k4']:.0%} | {r['k16']:.0%} | {r['extraction']:.0%} |")
    if args.plot:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        seed0 = table(fp, rows, only_seed="0")
        for mode, marker in (("records", "o"), ("lookalikes", "s")):
            curve = [r for r in seed0 if r["mode"] == mode]  # every lam_s on seed 0 (the screen)
            full = [r for r in lines if r["mode"] == mode and len(r["seeds"]) == 3]  # confirmed on 3 seeds
            for pts, style, label in ((curve, "--", f"{mode}, seed 0"), (full, "", f"{mode}, mean of seeds 0–2")):
                kw = dict(ls=style, marker=marker, label=label) if style else dict(ls="none", marker=marker, ms=9,
                                                                                   mfc="none", label=label)
                ax1.plot([r["lam_s"] for r in pts], [r["ppl"] / r["fp_ppl"] for r in pts], **kw)
                ax2.plot([r["lam_s"] for r in pts], [100 * r["k4"] for r in pts], **kw)
        for r in lines:
            if r["mode"] == "plain GPTQ":
                ax1.axhline(r["ppl"] / r["fp_ppl"], color="grey", lw=1,
                            label=f"plain GPTQ, same L (seeds {','.join(r['seeds'])})")
        ax2.axhline(90, color="grey", lw=1, ls=":", label="goal: 90 % of FP")
        for ax, title in ((ax1, "alpha-1 perplexity (× FP)"), (ax2, "alpha-1 k = 4 exposure (% of FP's)")):
            ax.set_xscale("log")
            ax.set_xlabel("lam_s (private weight of L's fit, relative to the traces)")
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
