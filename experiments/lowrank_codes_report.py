"""Plot of alpha 1 with L stored as fp16 factors and as 4-bit codes at the same bytes, over scenario seeds:
per mode, the fraction of the FP fine-tune's k = 4 and k = 16 exposure and greedy k = 16 extraction that
alpha 1 keeps (bars: the mean over seeds over FP's mean, as experiments/split_report.py gives it; dots: each
seed's own fraction), and the perplexity ratio to FP.

    python experiments/lowrank_codes_report.py docs/lowrank_codes/alpha1_cpu_seed*.json \
        --png docs/lowrank_codes/alpha1_codes.png
"""
from __future__ import annotations

import argparse
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PAIRS = {"records": ("records", "records, L 4-bit"), "look-alikes": ("lookalikes", "lookalikes, L 4-bit")}
MEASURES = (("k=4 exposure", lambda r: r["measured_exposure_by_k"]["4"]),
            ("k=16 exposure", lambda r: r["measured_exposure_by_k"]["16"]),
            ("k=16 extraction", lambda r: r["extraction_by_k"]["16"]))


def fractions(paths: list[str]) -> dict:
    """{(mode, variant): {measure: [fraction of FP per seed], measure + " pair": [(value, FP's) per seed]},
    plus "ppl" ratios}."""
    out: dict = {}
    for path in paths:
        for seed, variants in json.load(open(path)).items():
            fp = variants["baselines"]["fp"]
            for mode, names in PAIRS.items():
                for name in names:
                    if name not in variants:
                        continue
                    row = next(r for r in variants[name]["rows"] if r["alpha"] == 1.0)
                    cell = out.setdefault((mode, name), {k: [] for m, _ in MEASURES for k in (m, m + " pair")}
                                          | {"ppl": [], "seeds": []})
                    if seed in cell["seeds"]:
                        continue
                    cell["seeds"].append(seed)
                    for m, get in MEASURES:
                        cell[m].append(get(row) / get(fp) if get(fp) else float("nan"))
                        cell[m + " pair"].append((get(row), get(fp)))
                    cell["ppl"].append(row["perplexity"] / fp["perplexity"])
    return out


def _of_means(pairs: list[tuple[float, float]]) -> float:
    return statistics.mean(v for v, _ in pairs) / statistics.mean(f for _, f in pairs)


def plot(data: dict, png: str) -> None:
    fig, axes = plt.subplots(1, len(PAIRS), figsize=(10, 3.8), sharey=True)
    for ax, (mode, names) in zip(axes, PAIRS.items()):
        for j, name in enumerate(names):
            cell = data.get((mode, name))
            if cell is None:
                continue
            xs = [i + 0.38 * (j - 0.5) for i in range(len(MEASURES))]
            means = [_of_means(cell[m + " pair"]) for m, _ in MEASURES]
            label = ("fp16 factors" if j == 0 else "4-bit codes") + f" (PPL {statistics.mean(cell['ppl']):.3f}× FP)"
            ax.bar(xs, means, width=0.36, label=label, alpha=0.8)
            for x, (m, _) in zip(xs, MEASURES):
                ax.scatter([x] * len(cell[m]), cell[m], color="k", s=10, zorder=3)
        ax.axhline(0.9, color="gray", ls="--", lw=1)
        ax.set_xticks(range(len(MEASURES)), [m for m, _ in MEASURES])
        ax.set_title(f"{mode}: alpha 1, L at 25 % of the base's bytes")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("fraction of the FP fine-tune's value")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    data = fractions(args.paths)
    for (mode, name), cell in data.items():
        print(f"{name:<22} seeds {','.join(cell['seeds'])}: " + ", ".join(
            f"{m} {_of_means(cell[m + ' pair']):.0%}" for m, _ in MEASURES) + f", PPL {statistics.mean(cell['ppl']):.3f}x")
    plot(data, args.png)


if __name__ == "__main__":
    main()
