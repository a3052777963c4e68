"""Does a low-rank part help the quality preset (no forget objective)? Alpha-1 retain perplexity of
one plain-GPTQ base with its ortho stream as the sparse part S alone, the low-rank part L alone
(per-layer ranks, weighted SVD), and both, at equal bytes, next to the FP fine-tune and alpha 0.

    python experiments/quality_split.py [--seed 0] [--budgets 0.11 0.25] [--out docs/ortho_split/quality_split_seed0.json]

One scenario seed of the demo's scenario (its fine-tune is cached and shared with `libortho demo`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from libortho import sources
from libortho.config import preset
from libortho.decompose import install, quantize_model, sieve_model
from libortho.plan import plan_decomposition
from libortho.evaluation import perplexity
from libortho.ortho_split import split_model
from libortho.scenario import ScenarioConfig, build_scenario
from libortho.switch import alpha

DOCS = Path(__file__).resolve().parents[1] / "docs"
PPL_WINDOWS = 16
SHARES = {"S": 0.0, "L": 1.0, "S+L": 0.5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.11, 0.25], help="0.11: the bytes of 1 %% sparse entries at g128")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    scenario = build_scenario(ScenarioConfig.demo(seed=args.seed), progress=False)
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    out = Path(args.out or DOCS / "ortho_split" / f"quality_split_seed{args.seed}.json")
    result = dict(scenario=scenario.config.to_dict(), perplexity_windows=PPL_WINDOWS, rows=[])
    fp, tok = sources.load_model(scenario.finetuned)
    result["fp_perplexity"] = perplexity(fp, tok, heldout, max_windows=PPL_WINDOWS)
    del fp
    torch.manual_seed(0)
    config = preset("quality", calib_tokens=8192)
    model, _ = sources.load_model(scenario.finetuned)
    parts, _ = quantize_model(model, plan_decomposition(model, tok, calib, config), config, progress=False)
    for budget in args.budgets:
        for name, share in SHARES.items():
            t0 = time.perf_counter()
            cfg = dataclasses.replace(config, ortho_budget=budget, lowrank_share=share)
            orthos, split = split_model(parts, cfg, sieve_model)
            install(model, parts, orthos, cfg)
            row = dict(variant=name, ortho_budget=budget, bytes={k: v for k, v in split.items() if k != "ranks"})
            for a in (0.0, 1.0) if not result["rows"] else (1.0,):
                with alpha(model, a):
                    row[f"alpha_{a:g}_perplexity"] = perplexity(model, tok, heldout, max_windows=PPL_WINDOWS)
            row["seconds"] = time.perf_counter() - t0
            result["rows"].append(row)
            out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name} @ {budget:g}: alpha 1 PPL {row['alpha_1_perplexity']:.3f} "
                  f"(FP {result['fp_perplexity']:.3f}), {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
