"""`libortho demo`: the privacy kill switch, end to end, on the built-in default.

SmolLM2-135M-Instruct (public model P) is fine-tuned on Python documentation plus private
records carrying canaries (each inserted k ∈ {1, 4, 16} times), and, as the retrain reference,
on the same public text without them (``ScenarioConfig.demo``: a short fine-tune, so that the
whole demo fits in 20 minutes on 2 CPU cores). The fine-tuned model is decomposed with the
library's privacy preset in look-alike mode: the owner does not list the records, only describes
their shape, and the forget objective is fitted on look-alike records generated from that
description (never trained). It is audited at alpha 0 and 1 next to the FP fine-tuned model and
the reference, with every attack of the audit; extraction by sampling runs at alpha 0, the
switch's claim. A pass/fail line per goal closes the run.

Left to ``experiments/forget_eval.py`` for their cost on a CPU: several scenario seeds, the
reference put through plain GPTQ, the hex keys' exposure (only extrapolated: their rank space is
too large to measure), sampling at every condition and the white-box gradient check.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifact
from . import sources
from .audit import audit, public_record_losses, write_report
from .config import PRESETS, OrthoConfig
from .decompose import decompose
from .layer import ortho_layers
from .memory import release_freed_memory
from .ortho_split import stored_bytes
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
    samples: int  # extraction by sampling at alpha 0, members only

    @staticmethod
    def of(quick: bool) -> "DemoPlan":
        if quick:
            return DemoPlan("quick", 512, (0.0, 1.0), 4, 32, 16, 64)
        return DemoPlan("demo", 8192, (0.0, 1.0), 16, 64, 32, 64)

    def scenario_config(self):
        from .scenario import ScenarioConfig

        return getattr(ScenarioConfig, self.scenario)()

    def audit_options(self) -> dict:
        """The audit's budgets and attacks: PIN exposure from measured ranks, no white-box check,
        extraction by sampling of the members at alpha 0."""
        return dict(
            exposure_candidates=self.exposure_candidates, frontier_cap=self.frontier_cap,
            perplexity_max_windows=self.perplexity_windows, exposure_formats=("digits",), white_box=False,
            sample_extraction=self.samples, sample_nonmembers=False, sample_conditions=("alpha=0",),
        )


def demo_lookalikes(scenario_config, per_format: int | None = None) -> list[CanaryRecord]:
    """The owner's forget texts: ``per_format`` look-alikes per format (None: as many as there are
    members), filled from the owner's descriptions of the scenario's record template family
    (``scenario.owner_lookalikes``, any secret format) with another seed, never trained."""
    from .scenario import owner_lookalikes

    return owner_lookalikes(scenario_config, scenario_config.seed + LOOKALIKE_SEED_OFFSET, per_format)


def run_demo(quick: bool, out_dir: Path, progress: bool = True) -> dict:
    """Build the scenario (cached), decompose, audit; returns the report with a `goals` list."""
    from .scenario import build_scenario

    start = time.perf_counter()
    torch.manual_seed(0)
    plan = DemoPlan.of(quick)
    scenario = build_scenario(plan.scenario_config(), progress=progress)
    t_scenario = time.perf_counter() - start
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()

    model, tok = sources.load_model(scenario.finetuned)
    public_model, _ = sources.load_model(scenario.public_model)
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
    artifact.save(model, tok, out_dir / "artifact", overwrite=True)

    density = stats.n_ortho / stats.n_weights
    ortho_bytes = stored_bytes(ortho_layers(model))
    report = audit(
        model, tok, scenario.read_split("heldout"), members, nonmembers, alphas=list(plan.alphas),
        # Loaders: the audit opens the reference and the FP model one at a time, only for their rows.
        reference=lambda: sources.load_model(scenario.reference)[0],
        baselines={"fp": lambda: sources.load_model(scenario.finetuned)},
        progress=progress, public_losses=public_losses, **plan.audit_options(),
        extra_settings=dict(
            decomposition=config.to_dict(), ortho_density=density, ortho_bytes=ortho_bytes,
            ortho_bytes_of_base=(ortho_bytes["sparse"] + ortho_bytes["lowrank"]) / ortho_bytes["base"],
            forget_texts=len(forget_records),
            forget_tokens=stats.n_private_tokens, decompose_seconds=stats.seconds,
            scenario=scenario.config.to_dict(), scenario_seconds=t_scenario,
            frozen_outside_decoder_linears="embeddings, norms and lm_head were frozen during fine-tuning, "
            "so every fine-tuned weight is inside a decomposed layer",
        ),
    )
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


def _pct(value: float | None) -> str:
    return f"{'–':>10}" if value is None else f"{100 * value:>9.0f}%"


def format_summary(report: dict) -> str:
    """The table a person reads at the end of the demo."""
    ks = sorted((k for k in report["rows"][0]["exposure_by_k"] if k != "nonmember"), key=int)
    attacks = [m for m in ("loss", "zlib", "min_k", "ref") if m in report["rows"][0]["mia"]]
    sampled = bool(report["settings"].get("sample_extraction"))
    head = (f"{'model':<14}{'ppl':>8}" + "".join(f"{'exp k=' + k:>10}" for k in ks)
            + "".join(f"{'extr k=' + k:>10}" for k in ks)
            + ("".join(f"{'samp k=' + k:>10}" for k in ks) if sampled else "")
            + "".join(f"{'AUC ' + m:>10}" for m in attacks) + f"{'KS ref':>8}")
    lines = [head, "-" * len(head)]
    for row in report["rows"]:
        name = row["label"] if row["kind"] != "alpha" else f"alpha {row['alpha']:.2f}"
        ks_p = row["ks_vs_reference"]["pvalue"] if row.get("ks_vs_reference") else float("nan")
        lines.append(
            f"{name:<14}{row['perplexity']:>8.2f}"
            + "".join(f"{_measured(row, k):>10.2f}" for k in ks)
            + "".join(_pct(row["extraction_by_k"][k]) for k in ks)
            + ("".join(_pct(row.get("sampled_extraction_by_k", {}).get(k)) for k in ks) if sampled else "")
            + "".join(f"{row['mia'][m]['auc']:>10.2f}" if m in row["mia"] else f"{'–':>10}" for m in attacks)
            + f"{ks_p:>8.3f}"
        )
    lines.append("exposure: PINs, measured ranks only (bits); extr: greedy; samp: "
                 f"{report['settings']['sample_extraction']['samples']} samples at T=1, alpha 0 only" if sampled else
                 "exposure: PINs, measured ranks only (bits); extr: greedy extraction")
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
