"""The restoring half of the switch against its budget: alpha-1 perplexity and PIN exposure as the
ortho stream grows, on one base (the forget objective in records mode is fitted once; only the sieve
changes), next to the FP fine-tune. Bytes count the CSR stream as stored (fp16 values, int32 columns,
int32 row pointers).

    python experiments/alpha1_curve.py [--seed 0] [--ratios 0.005 0.01 0.02 0.05 0.1 0.2] [--out docs/alpha1_curve.json]

Writes the JSON (rows appended as they finish) and a plot next to it (exposure and PPL vs ortho MiB).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from libortho import sources
from libortho.config import preset
from libortho.decompose import install, quantize_model, sieve_model
from libortho.plan import plan_decomposition
from libortho.evaluation import perplexity
from libortho.scenario import ScenarioConfig, build_scenario
from libortho.switch import alpha
from libortho.unlearn import forget_exposure

DOCS = Path(__file__).resolve().parents[1] / "docs"
MEASURE = dict(n_samples=128, frontier_cap=64)  # as experiments/forget_eval.py audits
PPL_WINDOWS = 16


def csr_bytes(orthos) -> int:
    return sum(o.nnz * (2 + 4) + (o.shape[0] + 1) * 4 for o in orthos.values())


def measure(model, tok, heldout: str, pins_by_k: dict[str, list]) -> dict:
    return dict(perplexity=perplexity(model, tok, heldout, max_windows=PPL_WINDOWS),
                exposure_by_k={k: forget_exposure(model, tok, recs, **MEASURE) for k, recs in pins_by_k.items()})


def pins_by_k(members: list) -> dict[str, list]:
    """The PIN (digit-secret) members, grouped by their repeat count k."""
    out: dict[str, list] = {}
    for r in members:
        if r.secret_format.startswith("digits"):
            out.setdefault(str(r.k), []).append(r)
    return out


def measure_alphas(model, tok, heldout: str, pins: dict[str, list], with_base: bool) -> dict:
    """{alpha_1: measure(...)}, and alpha_0 too when `with_base` (the first row: every row shares the base)."""
    row = {}
    for a in (0.0, 1.0) if with_base else (1.0,):
        with alpha(model, a):
            row[f"alpha_{a:g}"] = measure(model, tok, heldout, pins)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--quick", action="store_true", help="the quick scenario (a smoke run)")
    ap.add_argument("--model", default=None, help="the public model P (default: the built-in SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="where models run (sets LIBORTHO_DEVICE)")
    ap.add_argument("--out", default=str(DOCS / "alpha1_curve.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        os.environ["LIBORTHO_DEVICE"] = args.device
    make = ScenarioConfig.quick if args.quick else ScenarioConfig.default
    scenario = build_scenario(make(seed=args.seed, **({"model": args.model} if args.model else {})), progress=False)
    members = scenario.load_members()
    pins = pins_by_k(members)
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    out_path = Path(args.out)
    result = dict(scenario=scenario.config.to_dict(), measure=dict(MEASURE, perplexity_windows=PPL_WINDOWS), rows=[])

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    fp, tok = sources.load_model(scenario.finetuned)
    result["fp"] = measure(fp, tok, heldout, pins)
    del fp
    save()
    print("FP", result["fp"], flush=True)

    torch.manual_seed(0)
    # The sparse stream alone, sieved under H_pub as it was measured (docs/RESULTS.md): the privacy preset's
    # base, with its byte budget replaced by --ratios and no private weight in the sieve.
    config = preset("privacy", calib_tokens=8192, forget_source="records", ortho_ratio=0.02, sieve_private_weight=0.0)
    model, _ = sources.load_model(scenario.finetuned)
    public, _ = sources.load_model(scenario.public_model)
    plan = plan_decomposition(model, tok, calib, config, public, [r.text for r in members])
    del public
    parts, stats = quantize_model(model, plan, config, progress=False)
    n_weights = stats.n_weights
    for ratio in args.ratios:
        t0 = time.perf_counter()
        cfg = dataclasses.replace(config, ortho_ratio=ratio)
        orthos = sieve_model(parts, cfg)
        nnz = install(model, parts, orthos, cfg)
        row = dict(ortho_ratio=ratio, density=nnz / n_weights, ortho_bytes=csr_bytes(orthos))
        row.update(measure_alphas(model, tok, heldout, pins, with_base=not result["rows"]))
        row["seconds"] = time.perf_counter() - t0
        result["rows"].append(row)
        save()
        print(f"ratio {ratio:g}: {row['ortho_bytes'] / 2**20:.1f} MiB, alpha 1 {row['alpha_1']}", flush=True)
    plot(result, out_path.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fp = result["rows"], result["fp"]
    mib = [r["ortho_bytes"] / 2**20 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted(fp["exposure_by_k"], key=int):
        line, = ax1.plot(mib, [r["alpha_1"]["exposure_by_k"][k] for r in rows], "o-", label=f"alpha 1, k={k}")
        ax1.axhline(fp["exposure_by_k"][k], ls="--", color=line.get_color(), lw=0.8)
        ax1.axhline(0.9 * fp["exposure_by_k"][k], ls=":", color=line.get_color(), lw=0.8)
    ax1.set(xscale="log", xlabel="ortho stream (MiB)", ylabel="PIN exposure (bits)",
            title="exposure (dashed: FP, dotted: 90 % of FP)")
    ax1.legend(fontsize=8)
    ax2.plot(mib, [r["alpha_1"]["perplexity"] / fp["perplexity"] for r in rows], "o-", label="alpha 1")
    ax2.axhline(1.01, ls=":", color="k", lw=0.8, label="goal 1.01x FP")
    ax2.set(xscale="log", xlabel="ortho stream (MiB)", ylabel="perplexity / FP", title="perplexity")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
