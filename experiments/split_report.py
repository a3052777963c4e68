"""The alpha-1 table of the two-part ortho stream over scenario seeds, from gpu_eval.sh result files
({run file: {seed: {variant: ...}}}) or forget_eval.py output files ({seed: {variant: ...}}): per variant, the mean over seeds and the range (min–max) of
alpha-1 perplexity, measured PIN exposure at k = 4 and 16 and greedy extraction at k = 16, each also
as a fraction of the FP fine-tune's mean; for records-half, the records listed and not listed.

    python experiments/split_report.py docs/ortho_split/preset_3seeds_default.json [more files ...] [--alpha 1]
"""
from __future__ import annotations

import argparse
import json
import statistics


def gather(results: dict, alpha: float) -> tuple[dict, dict]:
    """({seed: FP summary}, {variant: {seed: alpha row}}) merged over the run files."""
    fp, rows = {}, {}
    for run in results.values():
        for seed, variants in run.items():
            for name, v in variants.items():
                if name == "baselines":
                    fp[seed] = v["fp"]
                elif "rows" in v:
                    row = next((r for r in v["rows"] if r.get("alpha") == alpha), None)
                    if row is not None:
                        rows.setdefault(name, {})[seed] = dict(row, ortho_bytes=v.get("ortho_bytes") or {})
    return fp, rows


def stat(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def table(fp: dict, rows: dict) -> str:
    seeds = sorted(fp)
    fp_ppl = statistics.mean(fp[s]["perplexity"] for s in seeds)
    fp_exp = {k: statistics.mean(fp[s]["measured_exposure_by_k"][k] for s in seeds) for k in ("4", "16")}
    fp_ext = statistics.mean(fp[s]["extraction_by_k"]["16"] for s in seeds)
    lines = ["| variant (alpha 1) | seeds | ortho bytes / base | PPL (× FP) | exposure k=4 (of FP) | k=16 (of FP) | "
             "greedy extraction k=16 (of FP) | exposure, all k, listed / not listed |", "|---" * 8 + "|"]
    lines.append(f"| FP fine-tune | {len(seeds)} | – | {stat([fp[s]['perplexity'] for s in seeds])} | "
                 f"{stat([fp[s]['measured_exposure_by_k']['4'] for s in seeds])} | "
                 f"{stat([fp[s]['measured_exposure_by_k']['16'] for s in seeds])} | "
                 f"{stat([fp[s]['extraction_by_k']['16'] for s in seeds])} | all members: "
                 f"{stat([fp[s]['measured_exposure_unlisted'] for s in seeds])} |")
    for name, by_seed in rows.items():
        rs = [by_seed[s] for s in seeds if s in by_seed]
        ob = rs[0]["ortho_bytes"]
        share = f"{(ob['sparse'] + ob['lowrank']) / ob['base']:.3f}" if ob else "–"
        ppl = [r["perplexity"] for r in rs]
        e4 = [r["measured_exposure_by_k"]["4"] for r in rs]
        e16 = [r["measured_exposure_by_k"]["16"] for r in rs]
        ext = [r["extraction_by_k"]["16"] for r in rs]
        listed = [r["measured_exposure_listed"] for r in rs if r.get("measured_exposure_listed") is not None]
        unlisted = [r["measured_exposure_unlisted"] for r in rs if r.get("measured_exposure_unlisted") is not None]
        split = f"{stat(listed)} / {stat(unlisted)}" if listed and unlisted else "–"
        lines.append(f"| {name} | {len(rs)} | {share} | {stat(ppl)} ({statistics.mean(ppl) / fp_ppl:.3f}×) | "
                     f"{stat(e4)} ({statistics.mean(e4) / fp_exp['4']:.0%}) | {stat(e16)} ({statistics.mean(e16) / fp_exp['16']:.0%}) | "
                     f"{stat(ext)} ({statistics.mean(ext) / fp_ext:.0%}) | {split} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--alpha", type=float, default=1.0)
    args = ap.parse_args()
    runs = {}
    for path in args.paths:
        with open(path) as f:
            data = json.load(f)
        is_run = all(key.isdigit() for key in data)  # forget_eval.py's own output: one run
        runs.update({path: data} if is_run else {f"{path}:{k}": v for k, v in data.items()})
    fp, rows = gather(runs, args.alpha)
    print(table(fp, rows))


if __name__ == "__main__":
    main()
