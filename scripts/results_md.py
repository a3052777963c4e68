"""Write docs/RESULTS.md from the committed report.json files (demo run + variants).

    python scripts/results_md.py [--demo docs/demo/report.json] [--variants docs/variants.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from scipy import stats

from libortho.privacy import auc_confidence_interval, paired_auc_difference
from libortho.scenario import ScenarioConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"


def fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _scenario_time(s: dict) -> str:
    seconds = s.get("scenario_seconds", 0)
    if seconds < 60:
        return "the scenario's two fine-tunes came from the cache (not in this wall time)"
    return f"building the scenario from scratch (dequantize the GGUF, two fine-tunes) {seconds:.0f} s"


def _first_run_line() -> list[str]:
    path = DOCS / "demo" / "first-run" / "report.json"
    if not path.exists():
        return []
    s = json.loads(path.read_text())["settings"]
    return [f"A first run on an empty cache (`LIBORTHO_CACHE=$(mktemp -d) libortho demo`, report in `docs/demo/first-run/`, "
            f"forget_public_weight {s['decomposition']['forget_public_weight']}): {s['wall_seconds']:.0f} s wall, "
            f"{s['scenario_seconds']:.0f} s of it building the scenario, peak RSS {s['peak_rss_gib']:.1f} GiB."]


def _demo_command(s: dict) -> str:
    if s.get("scenario_seconds", 0) < 60:
        return "`libortho demo --out runs/demo-default`"
    return "`LIBORTHO_CACHE=$(mktemp -d) libortho demo --out runs/demo-cold` (an empty cache: a first run on a fresh machine)"


def demo_section(report: dict, source: str) -> list[str]:
    s = report["settings"]
    ks = sorted((k for k in report["rows"][0]["exposure_by_k"] if k != "nonmember"), key=int)
    lines = [
        "## The built-in demo (`libortho demo`)",
        "",
        f"Source: `{source}` (plots: `docs/demo/alpha_sweep.png`, `docs/demo/roc.png`). Command: {_demo_command(s)},",
        f"then the report files copied to `docs/demo/`. Wall time {s.get('wall_seconds', 0):.0f} s, "
        f"peak RSS {s.get('peak_rss_gib', 0):.1f} GiB on 2 CPU cores, of which: {_scenario_time(s)}, "
        f"decomposition {s.get('decompose_seconds', 0):.0f} s, the rest the audit of five conditions.",
        *_first_run_line(),
        "",
        f"Scenario: SmolLM2-135M-Instruct fine-tuned (decoder linear layers only; embeddings, norms, lm_head frozen) on Python",
        f"documentation + {s['n_members']} private records ({s['members_per_k']} per k, formats {s['secret_formats']}),",
        f"{s['n_nonmembers']} non-members never trained; retrain reference = same fine-tune without the records.",
        f"Decomposition: `{ {k: v for k, v in s['decomposition'].items() if k in ('bits', 'group_size', 'method', 'score', 'ortho_ratio', 'forget_ratio', 'forget_public_weight')} }`,",
        f"ortho density {100 * s['ortho_density']:.2f} %, of which {100 * s['forget_density']:.2f} % is the forget-aware support; "
        f"calibration on public text only. Exposure: exact digit-trie rank for PINs (sampled trie above the frontier cap), "
        f"skew-normal extrapolation over {s['exposure_candidates']} candidates for the hex keys.",
        "",
        "| model | PPL | " + " | ".join(f"exposure k={k}" for k in ks) + " | " + " | ".join(f"extraction k={k}" for k in ks)
        + " | AUC loss | AUC zlib | AUC Min-K | KS p vs reference |",
        "|---" * (6 + 2 * len(ks)) + "|",
    ]
    for row in report["rows"]:
        name = row["label"] if row["kind"] != "alpha" else f"libortho alpha {row['alpha']:.2f}"
        ks_p = row["ks_vs_reference"]["pvalue"] if row.get("ks_vs_reference") else None
        lines.append(
            f"| {name} | {row['perplexity']:.2f} | "
            + " | ".join(fmt(row["exposure_by_k"][k]) if row["exposure_by_k"][k] is not None else "inf" for k in ks) + " | "
            + " | ".join(f"{100 * row['extraction_by_k'][k]:.0f} %" for k in ks) + " | "
            + " | ".join(fmt(row["mia"][m]["auc"]) for m in ("loss", "zlib", "min_k"))
            + f" | {fmt(ks_p, 3)} |"
        )
    lines += ["", "PIN canaries only (`digits:6`, |R| = 10^6, max exposure 19.93 bits): exact digit-trie rank, or the",
              "sampled trie when more than the frontier cap of candidates beat the secret. Median exposure per k, and how many",
              "of the PINs are still ranked first among all 10^6 candidates:", "",
              "| model | " + " | ".join(f"median exposure k={k}" for k in ks) + " | " + " | ".join(f"rank 1, k={k}" for k in ks) + " |",
              "|---" * (1 + 2 * len(ks)) + "|"]
    for row in report["rows"]:
        recs = [d for d in report["records"][row["label"]] if d["member"] and d["id"].startswith("pin")]
        name = row["label"] if row["kind"] != "alpha" else f"libortho alpha {row['alpha']:.2f}"
        med = [statistics.median(d["exposure"] for d in recs if str(d["k"]) == k) for k in ks]
        top = [sum(d["rank"] <= 1 for d in recs if str(d["k"]) == k) for k in ks]
        n = [sum(str(d["k"]) == k for d in recs) for k in ks]
        lines.append(f"| {name} | " + " | ".join(fmt(m) for m in med) + " | " + " | ".join(f"{t}/{c}" for t, c in zip(top, n)) + " |")
    lines += ["", "Hex keys (`hex:8`, |R| = 2^32) use the Secret Sharer's skew-normal extrapolation from the sampled candidates;",
              "with few candidates it extrapolates far beyond what was observed (values of tens to hundreds of bits, `inf` for",
              "some), so the per-k means above that include keys are dominated by it: read the PIN table for exposure.", ""]
    lines += ["", "Goals of issue 3 on this run:", ""]
    lines += [f"- **{'PASS' if g['passed'] else 'FAIL'}** {g['goal']}: {g['measured']}" for g in report.get("goals", [])]
    lines.append("")
    return lines


# The variant whose settings libortho.demo and `decompose --forget` use by default (docs/findings.md says why).
DEFAULT_VARIANT = "gptq-g64 diag 2% + forget 1%, private attribution only"
BASELINE_NAMES = {"model": "FP fine-tuned", "fp": "FP fine-tuned", "reference": "retrain reference"}


def _exposure(row: dict) -> float:
    return row.get("measured_exposure_mean", row["exposure_mean"])


def _aucs(row: dict, n_members: int, n_nonmembers: int) -> str:
    """Loss-attack AUC with its 95 % interval, then zlib and Min-K%."""
    lo, hi = auc_confidence_interval(row["auc"]["loss"], n_members, n_nonmembers)
    return f"{row['auc']['loss']:.2f} [{lo:.2f}, {hi:.2f}] / " + " / ".join(f"{row['auc'][m]:.2f}" for m in ("zlib", "min_k"))


def variants_section(data: dict) -> list[str]:
    scenario = ScenarioConfig.from_dict(data["scenario"])
    n_members = scenario.members_per_format() * len(scenario.formats)
    n_nonmembers = scenario.nonmembers_per_format() * len(scenario.formats)
    lines = [
        "## Variants on the same scenario (`python scripts/variants.py`)",
        "",
        f"Audit settings (lighter than the demo): {data['audit_settings']}. Raw numbers: `docs/variants.json`;",
        "trade-off plot: `docs/tradeoff.png`. Exposure = mean over the member PINs of the measured rank's exposure",
        "(digit trie; hex keys' skew-normal extrapolations left out), max 19.93 bits. AUC = loss attack (zlib / Min-K% in the",
        "json). ‖∇‖ = white-box check: norm of the members' secret-loss gradient w.r.t. the decoder's linear weights.",
        "",
        "KS p: member-record losses against the FP retrain reference (the goal), and against the reference put through",
        "the same decomposition at alpha 0 (`KS p q-ref`), which takes out what INT4 does to every loss.",
        f"Loss AUC in brackets: Hanley-McNeil 95 % interval ({n_members} members, {n_nonmembers} non-members), the noise of",
        "one scenario seed: rows whose intervals overlap widely are not shown to differ.",
        "",
        "| construction | ortho % | forget % | α0 PPL | α0 exposure | α0 extraction | α0 AUC loss / zlib / Min-K | α0 KS p "
        "| α0 KS p q-ref | α0 ‖∇‖ | α1 PPL | α1 exposure | α1 extraction | α1 ‖∇‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in data.get("baselines", {}).items():
        lines.append(
            f"| {BASELINE_NAMES.get(name, name)} | – | – | {row['perplexity']:.2f} | {_exposure(row):.2f} | {100 * row['extraction_rate']:.0f} % "
            f"| {_aucs(row, n_members, n_nonmembers)} | {fmt(row['ks_p'], 3)} | | {fmt(row.get('canary_grad_norm'))} | | | | |"
        )
    for name, v in data.get("variants", {}).items():
        a0, a1 = v["rows"]
        lines.append(
            f"| {name}{' **(the default)**' if name == DEFAULT_VARIANT else ''} | {100 * v['ortho_density']:.2f} | {100 * v['forget_density']:.2f} | {a0['perplexity']:.2f} "
            f"| {_exposure(a0):.2f} | {100 * a0['extraction_rate']:.0f} % | {_aucs(a0, n_members, n_nonmembers)} | {fmt(a0['ks_p'], 3)} "
            f"| {fmt(a0.get('ks_p_vs_quantized_reference'), 3)} "
            f"| {fmt(a0.get('canary_grad_norm'))} | {a1['perplexity']:.2f} | {_exposure(a1):.2f} | {100 * a1['extraction_rate']:.0f} % "
            f"| {fmt(a1.get('canary_grad_norm'))} |"
        )
    lines.append("")
    return lines


def alpha_sweep_section(report: dict, source: str) -> list[str]:
    """The brief's alpha grid on the demo's artifact: one row per audited condition."""
    from libortho.demo import measured_exposure

    ks = sorted((k for k in report["rows"][0]["exposure_by_k"] if k != "nonmember"), key=int)
    lines = [
        "## Alpha sweep of the demo's artifact (`libortho audit`)",
        "",
        f"Source: `{source}` (plots beside it). Command: `libortho audit runs/demo-default/artifact --public <scenario>/public_heldout.txt "
        "--private <scenario>/members.jsonl --nonmembers <scenario>/nonmembers.jsonl --reference <scenario>/reference "
        "--alpha 0 0.25 0.5 0.75 1 --candidates 64 --max-windows 32 --frontier-cap 32 --out runs/alpha-sweep` (the demo's settings), `<scenario>` being the demo's "
        "cached scenario folder. PIN exposure: measured ranks only (bits, max 19.93).",
        "",
        "| condition | PPL | " + " | ".join(f"PIN exposure k={k}" for k in ks) + " | " + " | ".join(f"extraction k={k}" for k in ks)
        + " | AUC loss / zlib / Min-K | TPR at 1 % FPR (loss) |",
        "|---" * (4 + 2 * len(ks)) + "|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['label']} | {row['perplexity']:.2f} | "
            + " | ".join(fmt(measured_exposure(report, row["label"], k)) for k in ks) + " | "
            + " | ".join(f"{100 * row['extraction_by_k'][k]:.0f} %" for k in ks) + " | "
            + " / ".join(f"{row['mia'][m]['auc']:.2f}" for m in ("loss", "zlib", "min_k"))
            + f" | {row['mia']['loss']['tpr_at_1pct_fpr']:.2f} |"
        )
    lines.append("")
    return lines


CONTROL = "gptq-g64 diag 2% + random revert 1% (control)"


def _pin_exposures(row: dict) -> dict[str, float]:
    return {r["id"]: r["exposure"] for r in row["records"]
            if r["member"] and r.get("exposure_method") not in (None, "skewnorm")}


def _loss_scores(row: dict) -> tuple[list[float], list[float]]:
    """Loss-attack scores (higher = member) of members and non-members, ordered by record id so
    that two rows pair up record by record."""
    records = sorted(row["records"], key=lambda r: r["id"])
    return [-r["loss"] for r in records if r["member"]], [-r["loss"] for r in records if not r["member"]]


def paired_row(name: str, row: dict, control_row: dict) -> str:
    """alpha-0 difference to a control on the same records: mean PIN exposure (Wilcoxon
    signed-rank p over the PINs) and loss AUC (stratified paired bootstrap interval)."""
    mine, theirs = _pin_exposures(row), _pin_exposures(control_row)
    ids = sorted(set(mine) & set(theirs))
    delta = [mine[i] - theirs[i] for i in ids]
    p = stats.wilcoxon(delta).pvalue if any(delta) else 1.0
    d_auc, lo, hi = paired_auc_difference(*_loss_scores(row), *_loss_scores(control_row))
    return (f"| {name} | {sum(delta) / len(delta):+.2f} (p = {p:.3f}, {len(ids)} PINs) "
            f"| {d_auc:+.3f} [{lo:+.3f}, {hi:+.3f}] |")


def paired_section(data: dict) -> list[str]:
    control = CONTROL
    variants, seen, same_as = {}, {}, []
    for n, v in data.get("variants", {}).items():
        row = v["rows"][0]
        if "records" not in row:
            continue
        # Variants that change only the ortho stream (score, budget) share one alpha-0 model: list it once.
        key = tuple(r["loss"] for r in row["records"])
        if key in seen:
            same_as.append(f"`{n}` = `{seen[key]}`")
            continue
        seen[key] = n
        variants[n] = row
    if control not in variants:
        return []
    rows = [paired_row(n, r, variants[control]) for n, r in variants.items() if n != control]
    return [
        "### Paired comparisons at alpha 0 (same records, same scenario)",
        "",
        "Each variant against the random-revert control, record by record: the difference of mean PIN exposure with the Wilcoxon",
        "signed-rank p over the member PINs, and the difference of loss-attack AUC with a stratified paired bootstrap",
        "95 % interval (2000 draws). Negative = leaks less than the control. Pairing removes the records' own",
        "variation, so these resolve smaller differences than the intervals in the table above.",
        "",
        f"| variant − `{control}` | Δ PIN exposure, bits | Δ loss AUC [95 %] |",
        "|---|---|---|",
        *rows,
        "",
        "Same alpha-0 model (identical per-record losses), not repeated: " + "; ".join(same_as) + "." if same_as else "",
        "",
    ]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any(x2 <= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in points)]


def plot_tradeoff(data: dict, out: Path) -> None:
    """alpha-0 leakage (PIN exposure, loss AUC) against alpha-0 perplexity, and alpha-1 quality against the
    ortho budget, one point per variant; baselines as reference lines; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = data.get("variants", {})
    fp_ppl = next((b["perplexity"] for label, b in data.get("baselines", {}).items()
                   if BASELINE_NAMES.get(label) == "FP fine-tuned"), None)
    # A destroyed model (e.g. pruning the selected weights) would squash every other point into a corner.
    off_scale = [n for n in variants if fp_ppl and variants[n]["rows"][0]["perplexity"] > 3 * fp_ppl]
    names = [n for n in variants if n not in off_scale]
    a0 = [variants[n]["rows"][0] for n in names]
    a1 = [variants[n]["rows"][1] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    panels = [(axes[0], [_exposure(r) for r in a0], "alpha 0: mean PIN exposure (bits)", lambda b: _exposure(b)),
              (axes[1], [r["auc"]["loss"] for r in a0], "alpha 0: MIA AUC (loss)", lambda b: b["auc"]["loss"])]
    ppl0 = [r["perplexity"] for r in a0]
    for ax, ys, ylabel, of_baseline in panels:
        ax.scatter(ppl0, ys, c="C0")
        for i, name in enumerate(names):
            ax.annotate(str(i + 1), (ppl0[i], ys[i]), textcoords="offset points", xytext=(4, 3), fontsize=8)
        front = sorted(pareto(list(zip(ppl0, ys))), key=lambda i: ppl0[i])
        ax.plot([ppl0[i] for i in front], [ys[i] for i in front], "C0--", lw=1, label="Pareto front")
        baselines = data.get("baselines", {})
        fp_b = next((b for label, b in baselines.items() if BASELINE_NAMES.get(label) == "FP fine-tuned"), None)
        ref_b = baselines.get("reference")
        if fp_b is not None:
            ax.axvline(1.10 * fp_b["perplexity"], color="grey", ls=":", lw=1, label="goal: PPL <= 1.10 x FP")
        if ref_b is not None and ax is axes[0]:
            ax.axhspan(_exposure(ref_b) - 1, _exposure(ref_b) + 1, color="C4", alpha=0.12, label="goal: reference ± 1 bit")
        if ax is axes[1]:
            ax.axhline(0.55, color="grey", ls="--", lw=1, label="goal: AUC <= 0.55")
        for j, (label, b) in enumerate(baselines.items()):
            ax.scatter([b["perplexity"]], [of_baseline(b)], marker="*", s=140, c=f"C{j + 2}",
                       label=BASELINE_NAMES.get(label, label))
        ax.set_xlabel("alpha 0: held-out perplexity")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    dens = [100 * variants[n]["ortho_density"] for n in names]
    ax.scatter(dens, [r["perplexity"] for r in a1], c="C1", label="alpha 1 PPL")
    ax.scatter(dens, ppl0, c="C0", marker="x", label="alpha 0 PPL")
    for i in range(len(names)):
        ax.annotate(str(i + 1), (dens[i], a1[i]["perplexity"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
    fp = next((b for label, b in data.get("baselines", {}).items() if BASELINE_NAMES.get(label) == "FP fine-tuned"), None)
    if fp is not None:
        ax.axhline(fp["perplexity"], color="k", lw=1, label="FP fine-tuned")
        ax.axhline(1.01 * fp["perplexity"], color="k", ls=":", lw=1, label="goal alpha 1: 1.01 x FP")
        ax.axhline(1.10 * fp["perplexity"], color="C0", ls=":", lw=1, label="goal alpha 0: 1.10 x FP")
    ax.set_xlabel("ortho budget (% of decoder weights)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    legend = "  ".join(f"{i + 1}: {n}" for i, n in enumerate(names))
    if off_scale:
        legend += "   Not drawn (alpha-0 PPL > 3 x FP): " + ", ".join(
            f"{n} ({variants[n]['rows'][0]['perplexity']:.0f})" for n in off_scale)
    fig.text(0.01, 0.005, legend, fontsize=6.5, wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default=str(DOCS / "demo" / "report.json"))
    ap.add_argument("--variants", default=str(DOCS / "variants.json"))
    ap.add_argument("--findings", default=str(DOCS / "findings.md"), help="hand-written conclusions appended verbatim")
    args = ap.parse_args()
    lines = ["# libortho: the privacy kill switch, measured", "",
             "Generated by `python scripts/results_md.py` from the committed report files; every number below comes from them.", ""]
    if Path(args.demo).exists():
        lines += demo_section(json.loads(Path(args.demo).read_text()), os.path.relpath(args.demo, DOCS.parent))
    sweep = DOCS / "alpha_sweep" / "report.json"
    if sweep.exists():
        lines += alpha_sweep_section(json.loads(sweep.read_text()), os.path.relpath(sweep, DOCS.parent))
    if Path(args.variants).exists():
        variants = json.loads(Path(args.variants).read_text())
        lines += variants_section(variants)
        lines += paired_section(variants)
        plot_tradeoff(variants, DOCS / "tradeoff.png")
    if Path(args.findings).exists():
        lines += [Path(args.findings).read_text()]
    (DOCS / "RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
