"""Why does lowrank_target="propagated" raise alpha-1 perplexity? Alpha-1 perplexity on the calibration text the fit
saw (in sample) and on the held-out text, for the privacy preset in records mode with L fitted to the residual or
propagated, the correction's ridge (config.propagated_ridge) set by --ridge. The rows quoted in libortho/propagated.py
came from this script at ridges 0.01 and 0.1 (its first runs, with X₁ of every layer read through the still
fine-tuned block, were the stacked corrections that docstring describes).

    PYTHONPATH=. python experiments/propagated_probe.py --seed 0 --target propagated --ridge 0.01 --out probe.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from libortho import alpha, decompose, sources
from libortho.config import preset
from libortho.evaluation import perplexity
from libortho.scenario import ScenarioConfig, build_scenario


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=("residual", "propagated"), default="propagated")
    ap.add_argument("--ridge", type=float, default=None, help="the correction's ridge (default: the config's)")
    ap.add_argument("--private-weight", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scenario = build_scenario(ScenarioConfig(seed=args.seed), progress=False)
    members = scenario.load_members()
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    model, tok = sources.load_model(scenario.finetuned)
    public = sources.load_model(scenario.public_model)[0]
    config = preset("privacy", forget_source="records", calib_tokens=8192, lowrank_target=args.target,
                    sieve_private_weight=args.private_weight,
                    sieve_private_inputs="finetuned" if args.private_weight > 0 else "base",
                    **({"propagated_ridge": args.ridge} if args.ridge is not None else {}))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    decompose(model, tok, calib, config, progress=False, public_model=public, forget_texts=[r.text for r in members])
    row = dict(vars(args), seconds=time.perf_counter() - t0)
    with alpha(model, 1.0):
        row["ppl_heldout"] = perplexity(model, tok, heldout, max_windows=16)
        row["ppl_calibration"] = perplexity(model, tok, calib, max_windows=16)
    print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
