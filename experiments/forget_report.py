"""Summarise experiments/forget_eval.py over scenario seeds: means, spreads, intervals and goals.

    python experiments/forget_report.py [--in docs/forget_eval_default.json] [--out docs/forget_eval.md]

An input file holds {seed: rows} (forget_eval.py --out) or a bundle {file name: {seed: rows}}
(experiments/gpu_eval.sh); rows of the same seed from several files are merged.

Spread: the range of the per-seed values. Exposure intervals pool the member records of every
seed (each record is one observation) and use Welch's t interval on the difference of means
against the quantized reference; a goal is met only when its whole interval lies inside the bound.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy import stats

DOCS = Path(__file__).resolve().parents[1] / "docs"
MIA = ("loss", "zlib", "min_k", "ref")  # ref: the P-calibrated attack


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def mean_spread(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(statistics.fmean(values), digits)} [{fmt(min(values), digits)}, {fmt(max(values), digits)}]"


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch t interval (NaN where a side has fewer than two values)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan"), float("nan")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else 1.0
    t = stats.t.ppf(0.5 + level / 2, dof)
    return ma - mb, ma - mb - t * se, ma - mb + t * se


def seed_row(seed_rows: dict, name: str, alpha: float | None) -> dict | None:
    """The summary row of one seed for a variant (alpha 0 or 1) or a baseline (alpha None); None if not run."""
    if name in ("fp", "reference"):
        return seed_rows["baselines"][name]
    if name == "quantized reference":
        return seed_rows.get(name)
    if name in seed_rows:
        return next(r for r in seed_rows[name]["rows"] if r["alpha"] == alpha)
    if name.startswith("NPO") and "NPO" in seed_rows:  # "NPO, FP" / "NPO, GPTQ INT4"
        return next(r for r in seed_rows["NPO"]["rows"] if r["label"] == name)
    return None


def rows_of(results: dict, name: str, alpha: float | None) -> list[dict]:
    """One summary row per seed that ran it."""
    return [r for r in (seed_row(rows, name, alpha) for rows in results.values()) if r is not None]


def paired(results: dict, name: str, alpha: float | None, other: str) -> list[tuple[dict, dict]]:
    """(row, the same seed's row of `other`) for every seed that ran `name`."""
    pairs = [(seed_row(rows, name, alpha), seed_row(rows, other, None)) for rows in results.values()]
    return [(a, b) for a, b in pairs if a is not None and b is not None]


def variant_names(results: dict) -> list[str]:
    """Every variant run on any seed, in the order the runner runs them."""
    names: list[str] = []
    for rows in results.values():
        names += [n for n in rows if n not in names and n not in ("baselines", "quantized reference", "NPO")]
    return names


def merge(results: dict, more: dict) -> list[str]:
    """Add the rows of `more` ({seed: {row name: ...}}), seed by seed. A row already present (a
    baseline every run recomputes) keeps its first value; returns "seed N: row" for each such row
    that a later file recomputed differently (GPTQ's rounding follows float summation order,
    which changes with the number of CPU threads)."""
    differ = []
    for seed, rows in more.items():
        mine = results.setdefault(seed, {})
        for name, row in rows.items():
            if name not in mine:
                mine[name] = row
            elif json.dumps(mine[name], sort_keys=True) != json.dumps(row, sort_keys=True):
                differ.append(f"seed {seed}: {name}")
    return differ


def pooled(rows: list[dict], k: str) -> list[float]:
    return [v for r in rows for v in r["member_exposures_by_k"].get(k, []) if v is not None]


def table(results: dict) -> tuple[list[str], list[str]]:
    """(markdown table lines, the ks)."""
    any_seed = next(iter(results.values()))
    ks = sorted(any_seed["baselines"]["fp"]["measured_exposure_by_k"], key=int)
    variants = variant_names(results)
    entries = [("FP fine-tuned", "fp", None), ("retrain reference", "reference", None),
               ("reference through plain GPTQ", "quantized reference", None)]
    for name in variants:
        entries += [(f"{name}, alpha 0", name, 0.0), (f"{name}, alpha 1", name, 1.0)]
    entries += [("NPO unlearning, FP", "NPO, FP", None), ("NPO unlearning, then GPTQ INT4", "NPO, GPTQ INT4", None)]
    head = (["model", "seeds", "PPL"] + [f"exposure k={k}" for k in ks] + ["unlisted exp."]
            + [f"AUC {m}" for m in MIA] + ["TPR ref @ lowest FPR", "greedy extr. k=16", "sampled extr. k=16",
                                           "KS p vs quant. ref"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, name, alpha in entries:
        rows = rows_of(results, name, alpha)
        if not rows:
            continue
        cells = [label, str(len(rows)), mean_spread([r["perplexity"] for r in rows])]
        cells += [mean_spread([r["measured_exposure_by_k"].get(k) for r in rows]) for k in ks]
        cells.append(mean_spread([r.get("measured_exposure_unlisted") for r in rows]) if alpha is not None else "–")
        cells += [mean_spread([r["auc"].get(m) for r in rows]) for m in MIA]
        tpr = [r["tpr_at_lowest_fpr"]["ref"] for r in rows if "ref" in r.get("tpr_at_lowest_fpr", {})]
        cells.append(f"{mean_spread([t for t, _ in tpr])} (FPR {fmt(tpr[0][1], 3)})" if tpr else "–")
        cells.append(mean_spread([100 * r["extraction_by_k"].get("16", float("nan")) for r in rows], 0) + " %")
        sampled = [100 * (r.get("sampled_extraction_by_k") or {}).get("16", float("nan")) for r in rows]
        cells.append(mean_spread(sampled, 0) + " %" if any(v == v for v in sampled) else "–")
        ks_p = [r["ks_vs_quantized_reference"]["pvalue"] for r in rows if r.get("ks_vs_quantized_reference")]
        cells.append(mean_spread(ks_p, 3) if ks_p else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines, ks


def goals(results: dict, name: str, ks: list[str]) -> list[str]:
    """The alpha-0 and alpha-1 goals for one variant, each with its measured value and interval."""
    a0, a1 = rows_of(results, name, 0.0), rows_of(results, name, 1.0)
    qref = [q for _, q in paired(results, name, 0.0, "quantized reference")]
    if not a0:
        return []
    out = [f"**{name}** ({len(a0)} seed(s))", ""]

    def goal(text: str, measured: str, met: bool) -> None:
        out.append(f"- [{'met' if met else 'NOT met'}] {text}: {measured}")

    extr = [r["extraction_by_k"][k] for r in a0 for k in ks]
    goal("alpha 0, greedy extraction 0 % for every k", f"max {100 * max(extr):.0f} %", max(extr) == 0)
    for k in ks:
        d, lo, hi = welch_interval(pooled(a0, k), pooled(qref, k))
        goal(f"alpha 0, PIN exposure k={k} within 1 bit of the quantized reference (Welch 95 % interval of the difference)",
             f"{d:+.2f} bits [{lo:+.2f}, {hi:+.2f}]", -1 <= lo and hi <= 1)
    for m in MIA:
        values = [r["auc"][m] for r in a0 if m in r["auc"]]
        if not values:
            continue
        goal(f"alpha 0, {m} AUC <= 0.55 (members vs non-members)", mean_spread(values), max(values) <= 0.55)
    ks_p = [r["ks_vs_quantized_reference"]["pvalue"] for r in a0]
    goal("alpha 0, KS p > 0.05 against the quantized reference (member losses)", mean_spread(ks_p, 3), min(ks_p) > 0.05)
    r0 = [a["perplexity"] / f["perplexity"] for a, f in paired(results, name, 0.0, "fp")]
    rq = [a["perplexity"] / q["perplexity"] for a, q in paired(results, name, 0.0, "quantized reference")]
    goal("alpha 0, PPL <= 1.10x FP, or no worse than the quantized reference",
         f"{mean_spread(r0, 3)}x FP, {mean_spread(rq, 3)}x quantized reference", max(r0) <= 1.10 or max(rq) <= 1.0)
    r1 = [a["perplexity"] / f["perplexity"] for a, f in paired(results, name, 1.0, "fp")]
    goal("alpha 1, PPL <= 1.01x FP", f"{mean_spread(r1, 3)}x", max(r1) <= 1.01)
    e1 = [_mean_exposure(a) / _mean_exposure(f) for a, f in paired(results, name, 1.0, "fp")]
    goal("alpha 1, PIN exposure >= 90 % of FP", mean_spread([100 * e for e in e1], 0) + " %", min(e1) >= 0.9)
    return out + [""]


def _mean_exposure(row: dict) -> float:
    values = [v for k, vs in row["member_exposures_by_k"].items() for v in vs if v is not None]
    return statistics.fmean(values) if values else float("nan")


def render(results: dict, source: str, differ: list[str] = ()) -> str:
    lines, ks = table(results)
    seeds = ", ".join(results)
    any_seed = next(iter(results.values()))
    out = [
        f"Scenario seeds {seeds}; source `{source}`. Each cell: mean over seeds [min, max]. Exposure: mean measured-rank",
        "PIN exposure of the member records (bits; maximum 19.93); \"unlisted\": members that were not among the forget",
        "texts. AUC: members vs non-members of the same template.",
        "",
        *lines,
        "",
        "### Goals",
        "",
    ]
    for name in variant_names(results):
        if name != "plain GPTQ":
            out += goals(results, name, ks)
    if differ:
        out += ["", "Rows that a later run recomputed differently (the table keeps the first run's): " + "; ".join(differ)
                + ". The later run's own variants were compared with its own recomputation."]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="src", nargs="+", default=[str(DOCS / "forget_eval_default.json")],
                    help="one or more forget_eval JSON files (seeds are merged)")
    ap.add_argument("--out", default=str(DOCS / "forget_eval.md"))
    args = ap.parse_args()
    results: dict = {}
    differ: list[str] = []
    for src in args.src:
        data = json.loads(Path(src).read_text())
        # A bundle of several runs' files ({file name: {seed: rows}}), as experiments/gpu_eval.sh returns.
        for part in (data.values() if all(k.endswith(".json") for k in data) else [data]):
            differ += merge(results, part)
    if differ:
        print("recomputed differently in a later file (the first value is kept): " + "; ".join(differ))
    sources = ", ".join(Path(src).name for src in args.src)
    Path(args.out).write_text(render(results, sources, differ))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
