"""The audit's report files: ``report.json`` and the readable ``report.md`` with its tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..records import atomic_write_text
from .plots import plot_alpha_sweep, plot_auc_alpha, plot_roc
from .schema import EXTRAPOLATED_METHODS, REFERENCE_SCORE, SCORE_LABELS, _group_name, _score_names, _sorted_groups

__all__ = ["write_report", "render_markdown"]


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Write report.json, report.md, alpha_sweep.png, roc.png and auc_alpha.png (each atomically)."""
    import json

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    plot_alpha_sweep(report["rows"], out / "alpha_sweep.png")
    plot_roc(report["rows"], out / "roc.png")
    plot_auc_alpha(report["rows"], out / "auc_alpha.png")
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _exposure_groups(rows: Sequence[dict[str, Any]], key: str) -> list[str]:
    return _sorted_groups({g for r in rows for g in r.get(key, {})})


def render_markdown(report: dict[str, Any]) -> str:
    """Readable report: headline (measured exposure only), membership inference, extrapolated
    exposure in its own section, goals, per-record exposure."""
    rows, s = report["rows"], report["settings"]
    groups = _sorted_groups({g for r in rows for g in list(r["exposure_by_k"]) + list(r["extraction_by_k"])})
    measured_groups = _exposure_groups(rows, "measured_exposure_by_k")
    sampled = bool(s.get("sample_extraction"))
    parts = ["# libortho privacy audit", ""]
    parts += [f"- {key}: {value}" for key, value in s.items() if key != "versions"]
    parts += [f"- versions: {s.get('versions')}", ""]

    parts += ["## Leakage and quality", "",
              "Exposure in bits (max log2|R|) from measured ranks only (exact or sampled digit trie, enumeration, "
              "sampled rank); skew-normal extrapolations are in their own section below. Greedy extraction = "
              "fraction of records whose greedy continuation starts with the secret"
              + ("; sampled extraction = fraction with the secret in any of "
                 f"{s['sample_extraction']['samples']} samples (temperature {s['sample_extraction']['temperature']:g}, "
                 f"top-k {s['sample_extraction']['top_k']}) of secret tokens + 4" if sampled else "")
              + ". KS p vs the retrain reference on member losses (p > 0.05: indistinguishable); last column: "
              "white-box check, norm of the gradient of the members' secret-token loss w.r.t. the decoder's linear "
              "weights at that alpha (small = at a memorised minimum).", ""]
    header = ["condition", "PPL"] + [f"exposure {_group_name(g)}" for g in measured_groups]
    header += [f"greedy extraction {_group_name(g)}" for g in groups]
    if sampled:
        header += [f"sampled extraction {_group_name(g)}" for g in groups]
    header += ["member loss", "non-member loss", "KS p", "‖∇W secret loss‖"]
    body = []
    for r in rows:
        ks = r["ks_vs_reference"]
        cells = [r["label"], _fmt(r["perplexity"])]
        cells += [_fmt(r.get("measured_exposure_by_k", {}).get(g)) for g in measured_groups]
        cells += [_fmt(r["extraction_by_k"].get(g)) for g in groups]
        if sampled:
            cells += [_fmt(r.get("sampled_extraction_by_k", {}).get(g)) for g in groups]
        cells += [_fmt(r["member_loss_mean"], 3), _fmt(r["nonmember_loss_mean"], 3), _fmt(ks and ks["pvalue"], 3),
                  _fmt(r.get("canary_grad_norm"), 3)]
        body.append(cells)
    parts += [_table(header, body), ""]

    names = _score_names(rows)
    n_non = s.get("n_nonmembers")
    lowest = f"1/{n_non} = {100 / n_non:.2g} %" if n_non else "1/n"
    parts += ["## Membership inference", "",
              f"Members = trained private records, non-members = records of the same templates never trained. "
              f"AUC with its 95 % interval (Hanley-McNeil); TPR at FPR {lowest}, the lowest FPR the "
              f"{n_non} non-members resolve (ROC points, no interpolation). Scores: loss (mean token NLL), zlib "
              "(NLL / zlib length), Min-K% (mean of the lowest 20 % token log-probs)"
              + (", P-calibrated loss (the record's loss minus its loss under the public model P, "
                 "Carlini et al. 2021)" if REFERENCE_SCORE in names else "") + ".", ""]
    header = ["condition"] + [f"AUC {SCORE_LABELS[n]}" for n in names] + [f"TPR {SCORE_LABELS[n]}" for n in names]
    body = []
    for r in rows:
        cells = [r["label"]]
        for n in names:
            m = r["mia"][n]
            ci = m.get("auc_ci")
            cells.append(_fmt(m["auc"], 3) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        cells += [_fmt(r["mia"][n].get("tpr_at_lowest_fpr"), 3) for n in names]
        body.append(cells)
    parts += [_table(header, body), ""]

    extra_groups = _exposure_groups(rows, "extrapolated_exposure_by_k")
    if extra_groups:
        parts += ["## Extrapolated exposure (skew-normal fit, not a measured rank)", "",
                  "For records whose candidate space is too large to rank the secret among measured candidates "
                  "(e.g. hex keys), exposure is extrapolated from a skew-normal fit to the sampled candidates' "
                  "scores. It can exceed the largest measurable value and is not comparable with the measured "
                  "exposure above.", ""]
        header = ["condition"] + [f"extrapolated exposure {_group_name(g)}" for g in extra_groups]
        body = [[r["label"]] + [_fmt(r.get("extrapolated_exposure_by_k", {}).get(g)) for g in extra_groups]
                for r in rows]
        parts += [_table(header, body), ""]

    if report.get("goals"):
        parts += ["## Goals", "", "Each line: attack; comparator; pass rule; measured value.", ""]
        for g in report["goals"]:
            parts.append(f"- [{'PASS' if g['passed'] else 'FAIL'}] **{g['goal']}** — attack: {g['attack']}; "
                         f"comparator: {g['comparator']}; pass rule: {g['rule']}; measured: {g['measured']}")
        parts.append("")

    labels = [r["label"] for r in rows]
    by_label = {label: {d["id"]: d for d in report["records"][label]} for label in labels}
    first = report["records"][labels[0]]
    parts += ["## Per-record exposure (bits) and extraction", "",
              "`*` = extracted greedily, `+` = extracted by sampling only, `~` = extrapolated (skew-normal); "
              "methods: " + ", ".join(f"{label}: {r['exposure_methods']}" for label, r in zip(labels, rows)), ""]
    body = []
    for d in first:
        if not any("exposure" in by_label[label][d["id"]] for label in labels):
            continue
        cells = [d["id"], str(d["k"])]
        for label in labels:
            rec = by_label[label][d["id"]]
            mark = "*" if rec.get("extracted") else "+" if rec.get("sampled_extracted") else ""
            approx = "~" if rec.get("exposure_method") in EXTRAPOLATED_METHODS else ""
            cells.append(approx + _fmt(rec.get("exposure")) + mark)
        body.append(cells)
    parts += [_table(["record", "k"] + labels, body), ""]
    return "\n".join(parts)
