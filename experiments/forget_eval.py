"""The forget objective measured over several scenario seeds, every variant audited the same way.

Per scenario seed: the FP fine-tune, the retrain reference, the reference through plain GPTQ
(the quantized reference: what the owner would ship had the records never been trained), plain
GPTQ of the fine-tune, and the forget objective with each source:

  records      every member record listed as a forget text;
  records-half half the members listed (the other half measures records the owner did not list);
  lookalikes   look-alike records filled from the owner's description of the records' shape (the
               template family's owner templates), another seed, never trained;
  control      the same objective and lam with X_priv = held-out public text of as many tokens
               (separates forgetting the records from merely pulling the model toward P);
  free         no texts, mu = 1;
  lookalikes x4 / control x4: four times as many look-alikes, and public text of as many words;
  records, look-alikes kept: records mode with four times as many look-alikes on the public side (the calibration
               text starts with them), so the base keeps the fine-tune's behaviour on records never trained; its
               control starts the calibration text with as many tokens of the public training text instead;
  records / lookalikes, lam L: the same at another lam (the curve over lam; the control at lam 30);
  records, sieve lam_s 30 / records, 5 % and 10 % ortho: the restoring half (alpha 1) with the sieve and
               refit under H_pub + 30·H_priv, or with a larger ortho budget;
  records / lookalikes, L 8-bit / 4-bit (/ fine-tuned inputs): the low-rank part stored as codes (and fitted on
               the fine-tuned blocks' private inputs); since both became the privacy preset's defaults, the plain
               "records" and "lookalikes" rows are these too;
  NPO          standard unlearning for comparison: NPO (beta 0.1) + retain loss on the fine-tune,
               forget set = the member records, retain set = the public training text, learning
               rate and steps by the stopping rule (unlearn.select_unlearning); audited in FP and
               after plain GPTQ INT4 (does quantization bring the records back?).

Rows are appended to the output JSON as each finishes (a crash loses nothing; a rerun skips what
is there). Summaries with means and spreads over seeds: experiments/forget_report.py.

    python experiments/forget_eval.py --seeds 0 1 2 [--preset default|eval|heldout|quick]
        [--templates default|prose|code] [--corpus pydoc|stdlib] [--only NAME ...]
        [--device cuda] [--sample-extraction 64] [--build-only]

--preset heldout: a held-out shape (ScenarioConfig.heldout: standard-library docstrings as public
text, support-ticket records with 6-digit account numbers inserted 4 and 16 times). --templates /
--corpus set the record template family / public text of any preset; the look-alikes then come
from that family's owner descriptions. Exposure is measured for the digits records only.

On a GPU the forward passes (fine-tuning, calibration, audits) run there in fp32 through the
layers' exact dense path; the GPTQ fits stay on the CPU. A scenario built on a GPU is not
bit-identical to one built on a CPU, so compare rows from the same device.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from libortho import sources
from libortho.audit import audit, public_record_losses
from libortho.config import preset
from libortho.decompose import decompose
from libortho.evaluation import perplexity
from libortho.demo import LOOKALIKE_SEED_OFFSET, measured_exposure
from libortho.switch import alpha
from libortho.privacy import forget_quality, mia_scores
from libortho.scenario import CORPORA, TEMPLATE_FAMILIES, ScenarioConfig, build_scenario, owner_lookalikes
from libortho.unlearn import UnlearnConfig, forget_exposure, select_unlearning

DOCS = Path(__file__).resolve().parents[1] / "docs"
BASE = dict(calib_tokens=8192)  # on top of the privacy preset
VARIANTS = {  # name -> (config overrides, forget texts)
    "plain GPTQ": (dict(forget_source="none"), None),
    "records": (dict(forget_source="records"), "members"),
    "lookalikes": (dict(forget_source="lookalikes"), "lookalikes"),
    "records, P activations": (dict(forget_source="records", forget_target="public_activations"), "members"),
    "lookalikes, P activations": (dict(forget_source="lookalikes", forget_target="public_activations"), "lookalikes"),
    "control, P activations": (dict(forget_source="records", forget_target="public_activations"), "public"),
    # P's activations as the target at a stronger pull (the curve over lam below is the default target's)
    **{f"{kind}, P activations, lam {lam:g}": (
        dict(forget_source=kind, forget_target="public_activations", forget_lambda=float(lam)), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes")) for lam in (10, 30)},
    "records-half": (dict(forget_source="records"), "half"),
    # Four times as many look-alikes (the same lam, relative to the traces): more of the names and digits the
    # records may hold are among the forget texts; the control: public text of the same number of words
    "lookalikes x4": (dict(forget_source="lookalikes"), "lookalikes x4"),
    "control x4 (public text as X_priv)": (dict(forget_source="lookalikes"), "public x4"),
    "control (public text as X_priv)": (dict(forget_source="records"), "public"),
    "free mu 1": (dict(forget_source="free", forget_mu=1.0), None),
    # The restoring half: the sieve and refit under H_pub + lam_s·H_priv, and a larger budget.
    "records, sieve lam_s 30": (dict(forget_source="records", sieve_private_weight=30.0), "members"),
    "records, 5 % ortho": (dict(forget_source="records", ortho_ratio=0.05), "members"),
    "records, 10 % ortho": (dict(forget_source="records", ortho_ratio=0.10), "members"),
    # Plain GPTQ's alpha 1 at the preset's ortho bytes, sparse only and split between S and L: the bar
    # the forget objective's alpha 1 must meet.
    "plain GPTQ, S 25 %": (dict(forget_source="none", lowrank_share=0.0), None),
    "plain GPTQ, S+L 25 %": (dict(forget_source="none", lowrank_share=0.5), None),
    # L stored as integer codes: the same bytes buy ~1.9x (8-bit) / ~3.6x (4-bit) the rank (lowrank.code_factors)
    **{f"{kind}, L {bits}-bit": (dict(forget_source=kind, lowrank_bits=bits), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes")) for bits in (8, 4)},
    "plain GPTQ, L 4-bit 25 %": (dict(forget_source="none", lowrank_share=1.0, lowrank_bits=4), None),
    # ... with the sieve's private term collected on the fine-tuned blocks' inputs (what alpha 1 restores)
    **{f"{kind}, L 4-bit, fine-tuned inputs": (dict(forget_source=kind, lowrank_bits=4, sieve_private_inputs="finetuned"), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes"))},
    # The preset's L fitted under H_pub + lam_s·H_priv at another private weight (the preset's lam_s is 3);
    # lam_s 0: public text alone, what of plain GPTQ's alpha-1 perplexity the forget base leaves L to recover
    **{f"{kind}, lam_s {w:g}": (dict(forget_source=kind, sieve_private_weight=float(w)), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes")) for w in (1, 3, 10, 30, 100, 300)},
    **{f"{kind}, lam_s 0": (dict(forget_source=kind, sieve_private_weight=0.0, sieve_private_inputs="base"), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes"))},
    # L fitted to the fine-tune's outputs on the inputs alpha 1 gives each layer (lowrank_target, propagated.py)
    **{f"{kind}, propagated L": (dict(forget_source=kind, lowrank_target="propagated"), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes"))},
    "records-half, propagated L": (dict(forget_source="records", lowrank_target="propagated"), "half"),
    # ... and the preset before it (L fitted to R = W_ft - W_base), since "records" / "lookalikes" are propagated now
    **{f"{kind}, residual L": (dict(forget_source=kind, lowrank_target="residual"), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes"))},
    "plain GPTQ, propagated L": (dict(forget_source="none", lowrank_share=1.0, lowrank_bits=4, lowrank_target="propagated"), None),
    **{f"{kind}, propagated L, ridge {r:g}": (dict(forget_source=kind, lowrank_target="propagated", propagated_ridge=r), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes")) for r in (0.01, 0.3)},
    # The curve over lam (the preset's 3 above), with the public-text control at the strongest pull.
    **{f"{kind}, lam {lam:g}": (dict(forget_source=kind, forget_lambda=float(lam)), texts)
       for kind, texts in (("records", "members"), ("lookalikes", "lookalikes")) for lam in (1, 10, 30, 100)},
    "control, lam 30": (dict(forget_source="records", forget_lambda=30.0), "public"),
    "records, look-alikes kept": (dict(forget_source="records"), "members"),
    "records, training text kept (control)": (dict(forget_source="records"), "members"),
}
AUDIT = dict(exposure_candidates=128, frontier_cap=64, perplexity_max_windows=16, progress=False,
             exposure_formats=("digits",), white_box=False, goals=False)
# The evaluation scenario: enough PINs per k and non-members per format to resolve 1 bit and FPR 0.5 %.
EVAL_SCENARIO = dict(n_per_k=32, n_nonmembers=200)
# Variants whose calibration text starts with more public-side text (experiments/retain_calibration.py): four times
# as many owner look-alikes as members, kept acting like the fine-tune; the control, as many tokens of the training text.
CALIB_PREFIX = {"records, look-alikes kept": "lookalikes", "records, training text kept (control)": "train"}
ALPHAS = [0.0, 1.0]  # --alphas
WITH_QUANTIZED_REFERENCE = True  # --no-quantized-reference


def summarise(row: dict, report: dict, listed: set[str]) -> dict:
    recs = report["records"][row["label"]]
    members = [d for d in recs if d["member"]]
    out = dict(label=row["label"], alpha=row.get("alpha"), perplexity=row["perplexity"],
               extraction_by_k=row["extraction_by_k"], sampled_extraction_by_k=row["sampled_extraction_by_k"],
               auc={m: v["auc"] for m, v in row["mia"].items()},
               tpr_at_lowest_fpr={m: [v["tpr_at_lowest_fpr"], v["lowest_fpr"]] for m, v in row["mia"].items()})
    ks = sorted({str(d["k"]) for d in members}, key=int)
    out["measured_exposure_by_k"] = {k: measured_exposure(report, row["label"], k) for k in ks}
    out["member_exposures_by_k"] = {  # per record, measured ranks only (for intervals pooled over seeds)
        k: [d["exposure"] for d in members if str(d["k"]) == k and d.get("exposure_method") not in (None, "skewnorm")]
        for k in ks
    }
    for name, keep in (("listed", lambda d: d["id"] in listed), ("unlisted", lambda d: d["id"] not in listed)):
        values = [d["exposure"] for d in members if keep(d) and d.get("exposure_method") not in (None, "skewnorm")]
        out[f"measured_exposure_{name}"] = sum(values) / len(values) if values else None
    out["member_losses"] = [d["loss"] for d in members]
    return out


def forget_texts(kind: str | None, scenario, members, seed: int) -> tuple[list[str] | None, set[str]]:
    """(texts, ids of the members listed among them)."""
    if kind is None:
        return None, set()
    if kind == "members":
        return [r.text for r in members], {r.id for r in members}
    if kind == "half":
        half = sorted(members, key=lambda r: random.Random(f"{seed}:{r.id}").random())[: len(members) // 2]
        return [r.text for r in half], {r.id for r in half}
    kind, _, times = kind.partition(" x")  # "lookalikes x4": four times as many texts
    times = int(times or 1)
    if kind == "lookalikes":  # the owner's descriptions of the scenario's template family, another seed
        config = scenario.config
        per_format = times * config.members_per_format()
        return [r.text for r in owner_lookalikes(config, config.seed + LOOKALIKE_SEED_OFFSET, per_format)], set()
    if kind == "public":  # as many tokens of held-out public text as the members have, in record-sized pieces
        words = scenario.read_split("heldout").split()
        n_words = times * sum(len(r.text.split()) for r in members)
        per = max(1, n_words // len(members))
        return [" ".join(words[i : i + per]) for i in range(0, n_words, per)], set()
    raise ValueError(kind)


def calibration_prefix(kind: str, scenario, members, seed: int, tok, times: int = 4) -> tuple[str, int]:
    """(text, its token count) put before the calibration text: "lookalikes", `times` owner look-alikes per member,
    or "train", as many tokens of the fine-tune's public training text as those look-alikes have."""
    shaped = "\n".join(forget_texts(f"lookalikes x{times}", scenario, members, seed)[0]) + "\n\n"
    n_tokens = len(tok(shaped)["input_ids"])
    if kind == "lookalikes":
        return shaped, n_tokens
    if kind == "train":
        return tok.decode(tok(scenario.read_split("train"))["input_ids"][:n_tokens]) + "\n\n", n_tokens
    raise ValueError(kind)


PRESETS = ("default", "eval", "heldout", "quick")  # --preset


def scenario_config(scenario_preset: str, seed: int, model: str | None = None, templates: str | None = None,
                    corpus: str | None = None) -> ScenarioConfig:
    """The scenario of a --preset for one seed; ``templates`` / ``corpus`` (None: the preset's)
    replace its record template family / public text."""
    overrides = dict(seed=seed, **(EVAL_SCENARIO if scenario_preset == "eval" else {}), **({"model": model} if model else {}))
    overrides.update({k: v for k, v in (("templates", templates), ("corpus", corpus)) if v is not None})
    make = {"quick": ScenarioConfig.quick, "heldout": ScenarioConfig.heldout}.get(scenario_preset, ScenarioConfig.default)
    return make(**overrides)


def run_name(scenario_preset: str, templates: str | None = None, corpus: str | None = None) -> str:
    """The preset's name with the template family and corpus it was given, e.g. ``eval-code``."""
    return "-".join([scenario_preset] + [v for v in (templates, corpus) if v is not None])


def run_seed(config: ScenarioConfig, results: dict, only: list[str] | None, out_path: Path) -> None:
    seed = config.seed
    scenario = build_scenario(config, progress=False)
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    rows = results.setdefault(str(seed), {})

    def save() -> None:  # atomic: a run stopped mid-write keeps the previous file
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out_path)

    public, tok = sources.load_model(scenario.public_model)
    audit_settings = dict(AUDIT, public_losses=public_record_losses(public, tok, members, nonmembers))  # P-calibrated attack
    del public
    reference, _ = sources.load_model(scenario.reference)
    if "baselines" not in rows:
        fp, _ = sources.load_model(scenario.finetuned)
        rep = audit(fp, tok, heldout, members, nonmembers, alphas=None, reference=reference, **audit_settings)
        rows["baselines"] = {("fp" if r["label"] == "model" else r["label"]): summarise(r, rep, set()) for r in rep["rows"]}
        save()
        del fp
    reference_losses = mia_scores(reference, tok, [r.text for r in members]).loss.tolist()
    del reference
    if "quantized reference" not in rows and WITH_QUANTIZED_REFERENCE:
        ref_q, _ = sources.load_model(scenario.reference)
        torch.manual_seed(0)
        decompose(ref_q, tok, calib, preset("privacy", **BASE, ortho_ratio=0.0), progress=False)
        with alpha(ref_q, 0.0):
            rep = audit(ref_q, tok, heldout, members, nonmembers, alphas=None, **audit_settings)
        rows["quantized reference"] = summarise(rep["rows"][0], rep, set())
        save()
        del ref_q
    q_losses = rows["quantized reference"]["member_losses"] if "quantized reference" in rows else None
    for name, (cfg, texts_kind) in VARIANTS.items():
        if name in rows or (only and name not in only):
            continue
        t0 = time.perf_counter()
        torch.manual_seed(0)
        config = preset("privacy", **{**BASE, **cfg})
        texts, listed = forget_texts(texts_kind, scenario, members, seed)
        variant_calib = calib
        if name in CALIB_PREFIX:
            prefix, n_tokens = calibration_prefix(CALIB_PREFIX[name], scenario, members, seed, tok)
            variant_calib = prefix + calib
            config = preset("privacy", **{**BASE, **cfg, "calib_tokens": BASE["calib_tokens"] + n_tokens})
        model, _ = sources.load_model(scenario.finetuned)
        public = sources.load_model(scenario.public_model)[0] if config.forgets else None
        stats = decompose(model, tok, variant_calib, config, progress=False, public_model=public, forget_texts=texts)
        del public
        rep = audit(model, tok, heldout, members, nonmembers, alphas=ALPHAS, **audit_settings)
        summaries = []
        for row in rep["rows"]:
            s = summarise(row, rep, listed)
            s["ks_vs_reference"] = asdict(forget_quality(s["member_losses"], reference_losses))
            if q_losses is not None:
                s["ks_vs_quantized_reference"] = asdict(forget_quality(s["member_losses"], q_losses))
            summaries.append(s)
        rows[name] = dict(config=config.to_dict(), ortho_density=stats.n_ortho / stats.n_weights, ortho_bytes=stats.ortho_bytes,
                          decompose_seconds=stats.seconds, seconds=time.perf_counter() - t0, rows=summaries)
        save()
        line = " | ".join(f"a{s['alpha']:g} ppl {s['perplexity']:6.2f} exp {_mean(s):5.2f} auc {s['auc']['loss']:.2f}" for s in summaries)
        print(f"seed {seed} {name:<34} {line}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "NPO" not in rows and (not only or "NPO" in only):
        rows["NPO"] = npo_rows(scenario, tok, members, nonmembers, rows, audit_settings, reference_losses, q_losses)
        save()


def npo_rows(scenario, tok, members, nonmembers, rows, audit_settings, reference_losses, q_losses) -> dict:
    """NPO unlearning of the fine-tune (stopping rule over a short lr sweep), audited in FP and
    after plain GPTQ INT4 of the privacy preset's bits and group size."""
    t0 = time.perf_counter()
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    pins = [r for r in members if r.secret_format.startswith("digits")]

    def measure(model) -> tuple[float, float]:
        return (forget_exposure(model, tok, pins, n_samples=AUDIT["exposure_candidates"], frontier_cap=AUDIT["frontier_cap"]),
                perplexity(model, tok, heldout, max_windows=AUDIT["perplexity_max_windows"]))

    chosen = select_unlearning(
        lambda: sources.load_model(scenario.finetuned)[0], tok, [r.text for r in members], scenario.read_split("train"),
        measure, reference_exposure=_mean(rows["baselines"]["reference"]),
        fp_perplexity=rows["baselines"]["fp"]["perplexity"], config=UnlearnConfig(method="npo", beta=0.1),
    )
    model = chosen.model
    summaries = []
    rep = audit(model, tok, heldout, members, nonmembers, alphas=None, **audit_settings)
    summaries.append(dict(summarise(rep["rows"][0], rep, set()), label="NPO, FP"))
    decompose(model, tok, calib, preset("privacy", **BASE, ortho_ratio=0.0), progress=False)
    with alpha(model, 0.0):
        rep = audit(model, tok, heldout, members, nonmembers, alphas=None, **audit_settings)
    summaries.append(dict(summarise(rep["rows"][0], rep, set()), label="NPO, GPTQ INT4"))
    for s in summaries:
        s["ks_vs_reference"] = asdict(forget_quality(s["member_losses"], reference_losses))
        if q_losses is not None:
            s["ks_vs_quantized_reference"] = asdict(forget_quality(s["member_losses"], q_losses))
    print(f"NPO: lr {chosen.point.lr:g}, {chosen.point.steps} steps ({chosen.reason}); FP exposure {_mean(summaries[0]):.2f}, "
          f"INT4 {_mean(summaries[1]):.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return dict(lr=chosen.point.lr, steps=chosen.point.steps, reason=chosen.reason,
                sweep=[asdict(p) for p in chosen.points], seconds=time.perf_counter() - t0, rows=summaries)


def _mean(row: dict) -> float:
    values = [v for v in row["measured_exposure_by_k"].values() if v == v]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", choices=PRESETS, default="default",
                    help="the default scenario, the larger evaluation scenario (32 PINs per k, 200 non-members), "
                         "the held-out shape (ScenarioConfig.heldout) or the quick smoke-test scenario")
    ap.add_argument("--templates", choices=TEMPLATE_FAMILIES, default=None,
                    help="the record template family (default: the preset's): default (account/PIN, deploy key), "
                         "prose (support tickets), code (Python snippets)")
    ap.add_argument("--corpus", choices=CORPORA, default=None,
                    help="the public text (default: the preset's): pydoc (language reference), stdlib (module docstrings)")
    ap.add_argument("--build-only", action="store_true", help="build (or find) the seeds' scenarios, then stop")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default=None, help="where models run (sets LIBORTHO_DEVICE): cpu, cuda, cuda:N")
    ap.add_argument("--model", default=None, help="the public model P (default: the built-in SmolLM2-135M)")
    ap.add_argument("--sample-extraction", type=int, default=None, metavar="N",
                    help="extraction by sampling: N samples per record prefix (default: the audit's, off)")
    ap.add_argument("--alphas", type=float, nargs="+", default=None,
                    help="the alphas each variant is audited at (default 0 1); alpha 0 is the base alone")
    ap.add_argument("--no-quantized-reference", action="store_true", help="skip the quantized reference's row")
    args = ap.parse_args()
    global WITH_QUANTIZED_REFERENCE
    if args.alphas:
        ALPHAS[:] = args.alphas
    WITH_QUANTIZED_REFERENCE = not args.no_quantized_reference
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        os.environ["LIBORTHO_DEVICE"] = args.device
        sources.default_device()  # a clear error now rather than after the first stage
    if args.sample_extraction is not None:
        AUDIT["sample_extraction"] = args.sample_extraction
    configs = [scenario_config(args.preset, seed, args.model, args.templates, args.corpus) for seed in args.seeds]
    if args.build_only:
        for config in configs:
            print(build_scenario(config, progress=False).root, flush=True)
        return
    out_path = Path(args.out or DOCS / f"forget_eval_{run_name(args.preset, args.templates, args.corpus)}.json")
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for config in configs:
        run_seed(config, results, args.only, out_path)


if __name__ == "__main__":
    main()
