"""`libortho demo`: the privacy kill switch, end to end, on the built-in default.

SmolLM2-135M-Instruct (public model P) is fine-tuned on Python documentation plus private
records carrying canaries (each inserted k ∈ {1, 4, 16} times), and, as the retrain reference,
on the same public text without them. The fine-tuned model is decomposed with the library's
privacy preset in look-alike mode: the owner does not list the records, only describes their
shape, and the forget objective is fitted on look-alike records generated from that description
(never trained). It is audited at several alphas next to the FP fine-tuned model and the
reference; the KS tests also compare against the reference put through plain GPTQ (what the owner
would ship had the records never been trained). A pass/fail line per goal closes the run.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import modelio
from .audit import audit, public_record_losses, write_report
from .config import PRESETS, OrthoConfig
from .goals import evaluate_goals
from .decompose import decompose
from .switch import alpha
from .lookalikes import lookalike_records
from .memory import release_freed_memory
from .privacy import forget_quality, mia_scores
from .records import CanaryRecord

# The privacy preset (docs/RESULTS.md says why), fitted on look-alikes of the private records.
DEMO_CONFIG = dict(PRESETS["privacy"], forget_source="lookalikes")
LOOKALIKE_SEED_OFFSET = 1000  # look-alikes come from another seed than the scenario's records


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run."""

    scenario: str  # ScenarioConfig preset
    calib_tokens: int
    alphas: tuple[float, ...]
    perplexity_windows: int
    exposure_candidates: int
    frontier_cap: int

    @staticmethod
    def of(quick: bool) -> "DemoPlan":
        if quick:
            return DemoPlan("quick", 512, (0.0, 1.0), 4, 32, 16)
        return DemoPlan("default", 8192, (0.0, 0.5, 1.0), 32, 64, 32)


def demo_lookalikes(scenario_config) -> list[CanaryRecord]:
    """The owner's forget texts: as many look-alikes per format as there are members, generated
    from the records' shape (scenario.RECORD_TEMPLATES) with another seed, never trained."""
    from .scenario import RECORD_TEMPLATES

    records = []
    for fmt in scenario_config.formats:
        kind = fmt.split(":")[0]
        records += lookalike_records(
            RECORD_TEMPLATES[kind], fmt, scenario_config.members_per_format(),
            seed=scenario_config.seed + LOOKALIKE_SEED_OFFSET, id_prefix=f"lookalike-{kind}",
        )
    return records


def quantized_reference_losses(scenario, tokenizer, config: OrthoConfig, members: list[CanaryRecord]) -> list[float]:
    """Member losses (mean NLL per token) of the retrain reference put through plain GPTQ with the
    same bits, group size and calibration text, at alpha 0: the honest counterfactual."""
    reference, _ = modelio.load_model(scenario.reference)
    plain = OrthoConfig(bits=config.bits, group_size=config.group_size, method=config.method,
                        ortho_ratio=0.0, calib_tokens=config.calib_tokens, seed=config.seed)
    decompose(reference, tokenizer, scenario.read_split("calibration"), plain, progress=False)
    with alpha(reference, 0.0):
        return mia_scores(reference, tokenizer, [r.text for r in members]).loss.tolist()


def run_demo(quick: bool, out_dir: Path, progress: bool = True) -> dict:
    """Build the scenario (cached), decompose, audit; returns the report with a `goals` list."""
    from .scenario import ScenarioConfig, build_scenario

    start = time.perf_counter()
    torch.manual_seed(0)
    plan = DemoPlan.of(quick)
    scenario = build_scenario(ScenarioConfig.quick() if quick else ScenarioConfig.default(), progress=progress)
    t_scenario = time.perf_counter() - start
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()

    model, tok = modelio.load_model(scenario.finetuned)
    public_model, _ = modelio.load_model(scenario.public_model)
    config = OrthoConfig(**DEMO_CONFIG, calib_tokens=plan.calib_tokens)
    forget_records = demo_lookalikes(scenario.config)
    stats = decompose(
        model, tok, scenario.read_split("calibration"), config, progress=progress,
        public_model=public_model, forget_texts=[r.text for r in forget_records],
    )
    # The attacker's public model P: its per-record losses, once, for the P-calibrated attack.
    public_losses = public_record_losses(public_model, tok, members, nonmembers)
    del public_model
    release_freed_memory()  # the decomposition's Hessians and block inputs
    modelio.save(model, tok, out_dir / "artifact", overwrite=True)
    q_reference_losses = quantized_reference_losses(scenario, tok, config, members)
    release_freed_memory()

    density = stats.n_ortho / stats.n_weights
    report = audit(
        model, tok, scenario.read_split("heldout"), members, nonmembers, alphas=list(plan.alphas),
        # Loaders: the audit opens the reference and the FP model one at a time, only for their rows.
        reference=lambda: modelio.load_model(scenario.reference)[0],
        baselines={"fp": lambda: modelio.load_model(scenario.finetuned)},
        progress=progress, public_losses=public_losses,
        exposure_candidates=plan.exposure_candidates, frontier_cap=plan.frontier_cap,
        perplexity_max_windows=plan.perplexity_windows, goals=False,
        extra_settings=dict(
            decomposition=config.to_dict(), ortho_density=density, forget_texts=len(forget_records),
            forget_tokens=stats.n_private_tokens, decompose_seconds=stats.seconds,
            scenario=scenario.config.to_dict(), scenario_seconds=t_scenario,
            frozen_outside_decoder_linears="embeddings, norms and lm_head were frozen during fine-tuning, "
            "so every fine-tuned weight is inside a decomposed layer",
        ),
    )
    for row in report["rows"]:
        losses = [d["loss"] for d in report["records"][row["label"]] if d["member"]]
        row["ks_vs_quantized_reference"] = asdict(forget_quality(losses, q_reference_losses))
    report["goals"] = evaluate_goals(report)
    report["settings"]["wall_seconds"] = time.perf_counter() - start
    report["settings"]["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_report(report, out_dir)
    return report


def _bits(value: float | None) -> float:
    """Exposure from report.json: None there means an infinite extrapolated exposure."""
    return float("inf") if value is None else float(value)


def measured_exposure(report: dict, label: str, k: str | None = None) -> float:
    """Mean member exposure from ranks actually observed (exact / sampled trie, enumeration, sampled
    rank), leaving out skew-normal extrapolations, which run far past anything measured."""
    values = [
        _bits(d["exposure"]) for d in report["records"][label]
        if d["member"] and d.get("exposure_method") not in (None, "skewnorm") and (k is None or str(d["k"]) == k)
    ]
    return sum(values) / len(values) if values else float("nan")


def _measured(row: dict, k: str) -> float:
    """Mean measured-rank exposure of the members with this k (extrapolations left out), or nan."""
    value = row.get("measured_exposure_by_k", {}).get(k)
    return float("nan") if value is None else float(value)


def format_summary(report: dict) -> str:
    """The table a person reads at the end of the demo."""
    ks = sorted((k for k in report["rows"][0]["exposure_by_k"] if k != "nonmember"), key=int)
    attacks = [m for m in ("loss", "zlib", "min_k", "ref") if m in report["rows"][0]["mia"]]
    head = f"{'model':<14}{'ppl':>8}" + "".join(f"{'exp k=' + k:>10}" for k in ks) + "".join(
        f"{'extr k=' + k:>10}" for k in ks) + "".join(f"{'AUC ' + m:>10}" for m in attacks) + f"{'KS ref':>8}{'KS qref':>9}"
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        name = row["label"] if row["kind"] != "alpha" else f"alpha {row['alpha']:.2f}"
        ks_p = row["ks_vs_reference"]["pvalue"] if row.get("ks_vs_reference") else float("nan")
        ks_q = row["ks_vs_quantized_reference"]["pvalue"] if row.get("ks_vs_quantized_reference") else float("nan")
        lines.append(
            f"{name:<14}{row['perplexity']:>8.2f}"
            + "".join(f"{_measured(row, k):>10.2f}" for k in ks)
            + "".join(f"{100 * row['extraction_by_k'][k]:>9.0f}%" for k in ks)
            + "".join(f"{row['mia'][m]['auc']:>10.2f}" if m in row["mia"] else f"{'–':>10}" for m in attacks)
            + f"{ks_p:>8.3f}{ks_q:>9.3f}"
        )
    lines.append("exposure: measured ranks only (bits); extrapolated estimates are in report.md")
    lines.append("")
    for g in report["goals"]:
        lines.append(f"[{'PASS' if g['passed'] else 'FAIL'}] {g['goal']}: {g['measured']}")
    return "\n".join(lines)


def run(args) -> int:
    out_dir = Path(args.out or "libortho-demo")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = run_demo(args.quick, out_dir)
    print()
    print(format_summary(report))
    s = report["settings"]
    print(f"\nwall time {s['wall_seconds']:.0f} s, peak RSS {s['peak_rss_gib']:.1f} GiB; "
          f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}; plots: {out_dir / 'alpha_sweep.png'}, {out_dir / 'roc.png'}")
    return 0
