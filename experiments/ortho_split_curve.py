"""The restoring half with two ortho parts: alpha-1 perplexity and PIN exposure against ortho bytes
for the sparse part alone (S, today's sieve), the low-rank part alone (L) and both (S + L), on one
base (the forget objective fitted once, in records or look-alike mode), next to the FP fine-tune.
At one budget it also compares the fits at equal bytes: the weighted SVD (b), the forget edit's
eigenbasis (a), the random-subspace control (c), and the sieve first instead of L first.

    python experiments/ortho_split_curve.py [--seed 0] [--mode records|lookalikes|none] [--budgets 0.05 0.1 0.25 0.5]
        [--parts S L S+L 0.75] [--lowrank-step 8] [--device cuda] [--out docs/ortho_split_curve_seed0_records.json]

--mode none is plain GPTQ (no forget objective, the sieve under H_pub alone): its own best split is the
bar the forget objective's alpha 1 must meet. A part given as a number is L's share of the bytes.

Bytes are the base's and the ortho stream's as stored (ortho_split.py). Writes the JSON (rows appended
as they finish, so an interrupted run keeps what it measured) and a plot next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from libortho import sources
from libortho.config import preset
from libortho.decompose import install, quantize_model, sieve_model
from libortho.plan import plan_decomposition
from libortho.lookalikes import lookalike_records
from libortho.ortho_split import split_model
from libortho.scenario import ScenarioConfig, build_scenario

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alpha1_curve import MEASURE, PPL_WINDOWS, measure, measure_alphas, pins_by_k  # noqa: E402  (the same measurement as the sparse curve)

DOCS = Path(__file__).resolve().parents[1] / "docs"
SHARES = {"S": 0.0, "L": 1.0, "S+L": 0.5}


def share_of(part: str) -> tuple[str, float]:
    """(row name, L's share of the bytes) for a --parts entry: S, L, S+L, or a share such as 0.75."""
    if part in SHARES:
        return part, SHARES[part]
    share = float(part)
    return f"S+L {share:g}", share
PIN_TEMPLATE = "Account {digits:4} of {first} {last} has PIN {secret}."


def forget_texts(mode: str, members: list, seed: int) -> list[str] | None:
    if mode == "none":
        return None
    if mode == "records":
        return [r.text for r in members]
    secrets = [r.secret for r in members]
    return [r.text for r in lookalike_records(PIN_TEMPLATE, "digits:6", 64, seed, secrets)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("records", "lookalikes", "none"), default="records",
                    help="the forget source; none: plain GPTQ")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--compare-at", type=float, default=0.25, help="the budget at which the fits are compared")
    ap.add_argument("--sieve-private-weight", type=float, default=30.0)
    ap.add_argument("--alloc", choices=("global", "layer"), default="global", help="lowrank_alloc (the first runs used global)")
    ap.add_argument("--parts", nargs="+", default=list(SHARES), help="which splits to sweep: S, L, S+L or L's share (0.75)")
    ap.add_argument("--lowrank-step", type=int, default=None, help="ranks in steps of this (default: OrthoConfig's)")
    ap.add_argument("--no-fits", action="store_true", help="skip the comparison of fits at --compare-at")
    ap.add_argument("--quick", action="store_true", help="the quick scenario (a smoke run)")
    ap.add_argument("--device", default=None, help="where models run (sets LIBORTHO_DEVICE)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device:
        os.environ["LIBORTHO_DEVICE"] = args.device
    make = ScenarioConfig.quick if args.quick else ScenarioConfig.default
    scenario = build_scenario(make(seed=args.seed), progress=False)
    members = scenario.load_members()
    pins = pins_by_k(members)
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    out_path = Path(args.out or DOCS / f"ortho_split_curve_seed{args.seed}_{args.mode}.json")
    result = dict(scenario=scenario.config.to_dict(), mode=args.mode, lowrank_alloc=args.alloc, measure=dict(MEASURE, perplexity_windows=PPL_WINDOWS),
                  sieve_private_weight=args.sieve_private_weight, rows=[])

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=1) + "\n")

    fp, tok = sources.load_model(scenario.finetuned)
    result["fp"] = measure(fp, tok, heldout, pins)
    del fp
    save()
    print("FP", result["fp"], flush=True)

    torch.manual_seed(0)
    # lowrank_fit="edit" while quantizing keeps each layer's edit, so that fit (a) can run later.
    forgets = args.mode != "none"
    step = {} if args.lowrank_step is None else dict(lowrank_step=args.lowrank_step)
    config = preset("privacy", calib_tokens=8192, forget_source=args.mode, sieve_private_weight=args.sieve_private_weight if forgets else 0.0,
                    ortho_budget=args.compare_at, lowrank_fit="edit" if forgets else "svd", lowrank_alloc=args.alloc, **step)
    result["config"] = config.to_dict()
    model, _ = sources.load_model(scenario.finetuned)
    public = sources.load_model(scenario.public_model)[0] if forgets else None
    plan = plan_decomposition(model, tok, calib, config, public, forget_texts(args.mode, members, args.seed))
    del public
    parts, _ = quantize_model(model, plan, config, progress=False)
    variants = [(b, name, dict(lowrank_share=share, lowrank_fit="svd")) for b in args.budgets for name, share in map(share_of, args.parts)]
    if not args.no_fits and forgets:
        variants += [(args.compare_at, f"S+L {fit}", dict(lowrank_share=0.5, lowrank_fit=fit)) for fit in ("edit", "random")]
        variants += [(args.compare_at, "S+L sieve first", dict(lowrank_share=0.5, lowrank_fit="svd", lowrank_first=False))]
    for budget, name, overrides in variants:
        t0 = time.perf_counter()
        cfg = dataclasses.replace(config, ortho_budget=budget, **overrides)
        orthos, split = split_model(parts, cfg, sieve_model)
        install(model, parts, orthos, cfg)
        row = dict(variant=name, ortho_budget=budget, **overrides, bytes={k: v for k, v in split.items() if k != "ranks"},
                   ranks=split["ranks"])
        row.update(measure_alphas(model, tok, heldout, pins, with_base=not result["rows"]))
        row["seconds"] = time.perf_counter() - t0
        result["rows"].append(row)
        save()
        print(f"{name} @ {budget:g}: {row['alpha_1']}", flush=True)
    plot(result, out_path.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = result["fp"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["variant"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["variant"] == name]
        x = [(r["bytes"]["lowrank"] + r["bytes"]["sparse"]) / r["bytes"]["base"] for r in rows]
        mean_exp = [sum(r["alpha_1"]["exposure_by_k"][k] for k in fp["exposure_by_k"] if k != "1") for r in rows]
        fp_exp = sum(v for k, v in fp["exposure_by_k"].items() if k != "1")
        ax1.plot(x, [e / fp_exp for e in mean_exp], "o-", label=name)
        ax2.plot(x, [r["alpha_1"]["perplexity"] / fp["perplexity"] for r in rows], "o-", label=name)
    ax1.axhline(0.9, ls=":", color="k", lw=0.8, label="90 % of FP")
    ax1.set(xlabel="ortho bytes / base bytes", ylabel="alpha-1 exposure / FP (k >= 4)", title=f"exposure ({result['mode']})")
    ax2.set(xlabel="ortho bytes / base bytes", ylabel="alpha-1 perplexity / FP", title="perplexity")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
