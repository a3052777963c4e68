"""Which scenario lets `libortho demo` run in 20 minutes on 2 CPU cores and still tell the default's story?

The default scenario's two fine-tunes alone take about 15 minutes on 2 cores (100 steps of 192
public tokens each, plus the records). This builds smaller candidates (fewer steps, shorter public
windows, optionally only the last blocks trained; "demo" is ScenarioConfig.demo, the one chosen)
and runs the demo's own pipeline on each: the FP fine-tune and the retrain reference, then the
privacy preset in look-alike mode at alpha 0 and 1, audited with the demo's budgets (PIN exposure
from measured ranks, greedy extraction, membership inference with the P-calibrated score;
``--sample-extraction 64`` adds sampling at alpha 0 as the demo does). One process per
(candidate, seed):

    LIBORTHO_DEVICE=cuda python experiments/demo_scenario_sweep.py --model GGUF --candidate NAME --seed 0 --out F.json

`train_tokens` (public tokens of both runs + record tokens) is the CPU cost that matters: the
fine-tunes cost about 0.75 GFLOP per training token on SmolLM2-135M.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from libortho import sources
from libortho.audit import audit, public_record_losses
from libortho.config import OrthoConfig
from libortho.decompose import decompose
from libortho.demo import DEMO_CONFIG, DemoPlan, demo_lookalikes
from libortho.scenario import ScenarioConfig, build_scenario

CANDIDATES = {  # name -> ScenarioConfig.default overrides ("demo": ScenarioConfig.demo)
    "default": {},
    "demo": None,
    "s40 w128": dict(steps=40, seq_len=128, lr=3e-4, warmup_steps=4),
    "s50 w128 last15": dict(steps=50, seq_len=128, lr=3e-4, warmup_steps=5, train_blocks=15),
    "s40 w128 last16 lr4": dict(steps=40, seq_len=128, lr=4e-4, warmup_steps=4, train_blocks=16),
    "s50 w96": dict(steps=50, seq_len=96, lr=2e-4, warmup_steps=5),
}
PLAN = DemoPlan.of(quick=False)
AUDIT = dict(PLAN.audit_options(), progress=False, goals=False)


def summary(row: dict) -> dict:
    return dict(perplexity=row["perplexity"], exposure_by_k=row["measured_exposure_by_k"],
                extraction_by_k=row["extraction_by_k"], sampled_extraction_by_k=row.get("sampled_extraction_by_k"),
                auc={m: v["auc"] for m, v in row["mia"].items()},
                tpr_ref=(row["mia"].get("ref") or {}).get("tpr_at_lowest_fpr"))


def run(name: str, seed: int, model_path: str | None, samples: int, lookalikes: int | None = None) -> dict:
    overrides = dict(seed=seed, **({"model": model_path} if model_path else {}))
    config = ScenarioConfig.demo(**overrides) if name == "demo" else ScenarioConfig.default(**CANDIDATES[name], **overrides)
    t0 = time.perf_counter()
    scenario = build_scenario(config, progress=False)
    build_s = time.perf_counter() - t0
    members, nonmembers = scenario.load_members(), scenario.load_nonmembers()
    heldout, calib = scenario.read_split("heldout"), scenario.read_split("calibration")
    public, tok = sources.load_model(scenario.public_model)
    settings = dict(AUDIT, sample_extraction=samples, public_losses=public_record_losses(public, tok, members, nonmembers))
    fp, _ = sources.load_model(scenario.finetuned)
    rep = audit(fp, tok, heldout, members, nonmembers, reference=lambda: sources.load_model(scenario.reference)[0],
                **dict(settings, sample_extraction=0, sample_conditions=None))
    rows = {("fp" if r["label"] == "model" else r["label"]): summary(r) for r in rep["rows"]}
    torch.manual_seed(0)
    forget = demo_lookalikes(config, lookalikes)
    stats = decompose(fp, tok, calib, OrthoConfig(**DEMO_CONFIG, calib_tokens=PLAN.calib_tokens), progress=False,
                      public_model=public, forget_texts=[r.text for r in forget])
    del public
    rep = audit(fp, tok, heldout, members, nonmembers, alphas=list(PLAN.alphas), **settings)
    rows.update({r["label"]: summary(r) for r in rep["rows"]})
    train_tokens = config.steps * config.batch * config.seq_len * 2 + sum(
        len(tok(r.text)["input_ids"]) * r.k for r in members)
    return dict(candidate=name, seed=seed, config=config.to_dict(), train_tokens=train_tokens, forget_texts=len(forget),
                build_seconds=build_s, decompose_seconds=stats.seconds, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidate", required=True, choices=list(CANDIDATES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="the public model (default: the built-in GGUF)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lookalikes", type=int, default=None, help="look-alikes per format (default: as many as members)")
    ap.add_argument("--sample-extraction", type=int, default=0, help="samples per prefix at alpha 0 (the demo: 64)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.candidate, args.seed, args.model, args.sample_extraction, args.lookalikes)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    r = result["rows"]
    print(f"{args.candidate} seed {args.seed}: {result['train_tokens']} train tokens; " + "; ".join(
        f"{k} ppl {v['perplexity']:.2f} exp {v['exposure_by_k']} auc {v['auc'].get('loss', float('nan')):.2f}"
        for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
