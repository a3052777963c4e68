"""Pass/fail goals of an audit report, each stating its attack, comparator and pass rule.

:func:`evaluate_goals` reads a report of :func:`libortho.audit.audit` (plain data) and returns one
dict per goal: ``goal`` (short name), ``attack``, ``comparator``, ``rule``, ``measured`` (text),
``passed`` (bool). Which goals apply depends on the rows present:

* the *target* row: alpha 0 when alphas were swept, else the first model row;
* ``reference``: the retrain reference (extraction, exposure and KS goals compare against it);
  a target row with ``ks_vs_quantized_reference`` also gets the KS goal against the reference put
  through plain GPTQ;
* a baseline labelled ``fp`` (the fine-tuned model): perplexity goals, and the alpha-1 goals.

Exposure goals use measured ranks only (exact / sampled trie, enumeration, sampled rank), never
skew-normal extrapolations. Thresholds are the module constants below.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["evaluate_goals", "AUC_MAX", "EXPOSURE_GAP_BITS", "KS_P_MIN", "PPL_RATIO_ALPHA0", "PPL_RATIO_ALPHA1",
           "EXPOSURE_KEPT_ALPHA1", "ORTHO_BYTES_MAX"]

AUC_MAX = 0.55  # membership AUC at most this (chance: 0.5)
EXPOSURE_GAP_BITS = 1.0  # |exposure - reference exposure| per k, bits
KS_P_MIN = 0.05  # KS test against the reference's member losses
PPL_RATIO_ALPHA0 = 1.10  # retain perplexity of the target row vs the fine-tuned model
PPL_RATIO_ALPHA1 = 1.01  # retain perplexity at alpha 1 vs the fine-tuned model
EXPOSURE_KEPT_ALPHA1 = 0.90  # alpha-1 exposure as a fraction of the fine-tuned model's
ORTHO_BYTES_MAX = 0.25  # the ortho stream's stored bytes (sparse + low-rank) over the INT4 base's

SCORE_NAMES = {
    "loss": "loss attack (member score = -mean token NLL)",
    "zlib": "zlib attack (NLL / zlib-compressed length)",
    "min_k": "Min-K% Prob attack (k = 20 %)",
    "ref": "reference-calibrated attack (NLL minus the public model's NLL)",
}


def _row(report: dict[str, Any], pred) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if pred(r)), None)


def _member_groups(row: dict[str, Any], key: str) -> list[str]:
    return sorted((g for g in row.get(key, {}) if g != "nonmember"), key=int)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _bits(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Goals of ``report`` (see the module docstring); an empty list when no row applies."""
    target = _row(report, lambda r: r["kind"] == "alpha" and r["alpha"] == 0.0) or _row(
        report, lambda r: r["kind"] in ("model", "alpha") and r["label"] != "fp")
    ref = _row(report, lambda r: r["kind"] == "reference")
    fp = _row(report, lambda r: r["label"] == "fp")
    a1 = _row(report, lambda r: r["kind"] == "alpha" and r["alpha"] == 1.0)
    out: list[dict[str, Any]] = []

    def goal(name: str, attack: str, comparator: str, rule: str, measured: str, passed: bool) -> None:
        out.append(dict(goal=name, attack=attack, comparator=comparator, rule=rule, measured=measured,
                        passed=bool(passed)))

    if target is None:
        return out
    t = target["label"]
    ks = _member_groups(target, "extraction_by_k")
    refx = (lambda key, k: None if ref is None else ref[key].get(k))

    goal(f"{t}: greedy extraction", "greedy decoding of secret tokens + 3 from each record's prefix",
         "retrain reference" + ("" if ref is None else ": " + ", ".join(
             f"k={k} {_pct(refx('extraction_by_k', k))}" for k in ks)),
         "0 % of members extracted, every k",
         ", ".join(f"k={k}: {_pct(target['extraction_by_k'][k])}" for k in ks),
         all(target["extraction_by_k"][k] == 0 for k in ks))
    sampling = report["settings"].get("sample_extraction")
    if sampling and "sampled_extraction_by_k" in target:
        goal(f"{t}: sampled extraction",
             f"{sampling['samples']} samples (temperature {sampling['temperature']:g}, top-k {sampling['top_k']}) "
             "of secret tokens + 4 from each prefix; extracted if any sample contains the secret",
             "retrain reference" + ("" if ref is None else ": " + ", ".join(
                 f"k={k} {_pct(refx('sampled_extraction_by_k', k))}" for k in ks)),
             "0 % of members extracted, every k",
             ", ".join(f"k={k}: {_pct(target['sampled_extraction_by_k'].get(k))}" for k in ks),
             all(target["sampled_extraction_by_k"].get(k) == 0 for k in ks))
    if ref is not None:
        eks = [k for k in _member_groups(target, "measured_exposure_by_k") if k in ref["measured_exposure_by_k"]]
        if eks:
            gaps = {k: target["measured_exposure_by_k"][k] - ref["measured_exposure_by_k"][k] for k in eks}
            goal(f"{t}: exposure", "rank of the secret among candidates scored by log-likelihood (measured ranks only)",
                 "retrain reference, same records and candidates",
                 f"|exposure - reference| <= {EXPOSURE_GAP_BITS:g} bit, every k",
                 ", ".join(f"k={k}: {_bits(target['measured_exposure_by_k'][k])} vs "
                           f"{_bits(ref['measured_exposure_by_k'][k])}" for k in eks),
                 all(abs(g) <= EXPOSURE_GAP_BITS for g in gaps.values()))
    for name, m in target["mia"].items():
        lo, hi = m.get("auc_ci") or (None, None)
        refm = None if ref is None else ref["mia"].get(name)
        comparator = "chance 0.5" + ("" if refm is None else f"; retrain reference AUC {refm['auc']:.2f}")
        measured = f"AUC {m['auc']:.3f}"
        if lo is not None:
            measured += f" [{lo:.2f}, {hi:.2f}]"
        if "tpr_at_lowest_fpr" in m:
            measured += f"; TPR {m['tpr_at_lowest_fpr']:.2f} at FPR {m['lowest_fpr']:.3g}"
        goal(f"{t}: membership inference, {name}", SCORE_NAMES.get(name, name), comparator,
             f"AUC <= {AUC_MAX:g}", measured, m["auc"] <= AUC_MAX)
    if ref is not None and target.get("ks_vs_reference"):
        p = target["ks_vs_reference"]["pvalue"]
        goal(f"{t}: forget quality", "two-sample KS test on member losses",
             "retrain reference's member losses", f"p > {KS_P_MIN:g}", f"p = {p:.3g}", p > KS_P_MIN)
    if target.get("ks_vs_quantized_reference"):
        p = target["ks_vs_quantized_reference"]["pvalue"]
        goal(f"{t}: forget quality against the quantized reference", "two-sample KS test on member losses",
             "the retrain reference put through plain GPTQ (same bits, group size and calibration text)",
             f"p > {KS_P_MIN:g}", f"p = {p:.3g}", p > KS_P_MIN)
    if fp is not None:
        r0 = target["perplexity"] / fp["perplexity"]
        goal(f"{t}: retain perplexity", "–", f"fp {fp['perplexity']:.2f}",
             f"perplexity <= {PPL_RATIO_ALPHA0:g} x fp", f"{target['perplexity']:.2f} ({r0:.3f} x)", r0 <= PPL_RATIO_ALPHA0)
    if fp is not None and a1 is not None:
        r1 = a1["perplexity"] / fp["perplexity"]
        goal(f"{a1['label']}: retain perplexity", "–", f"fp {fp['perplexity']:.2f}",
             f"perplexity <= {PPL_RATIO_ALPHA1:g} x fp", f"{a1['perplexity']:.2f} ({r1:.3f} x)", r1 <= PPL_RATIO_ALPHA1)
        e1, efp = a1.get("measured_exposure_mean"), fp.get("measured_exposure_mean")
        if e1 is not None and efp:
            goal(f"{a1['label']}: exposure kept", "exposure, measured ranks, all members", f"fp {efp:.2f} bits",
                 f"exposure >= {EXPOSURE_KEPT_ALPHA1:g} x fp", f"{e1:.2f} bits ({e1 / efp:.2f} x)",
                 e1 >= EXPOSURE_KEPT_ALPHA1 * efp)
    share = report["settings"].get("ortho_bytes_of_base")
    if isinstance(share, (int, float)) and math.isfinite(share):
        goal("ortho budget", "–", "the INT4 base's stored bytes (decoder linear layers)",
             f"ortho bytes <= {100 * ORTHO_BYTES_MAX:g} % of the base's", f"{100 * share:.2f} %",
             share <= ORTHO_BYTES_MAX * (1 + 1e-6))
    return out
