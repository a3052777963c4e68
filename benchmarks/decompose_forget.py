"""Cost of the forget objective: decomposition time with and without it, same model and settings.

Decomposes the built-in model (SmolLM2-135M) with the privacy preset, once as plain GPTQ and once
with the forget objective on 48 look-alike texts (P = the same checkpoint: the timing does not
depend on the weights), alternating, --repeats times each; writes the medians to
docs/decompose_forget_benchmark.json.

    python benchmarks/decompose_forget.py [--repeats 1] [--threads 1] [--calib-tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from libortho import sources
from libortho.config import PRESETS, OrthoConfig
from libortho.decompose import decompose
from libortho.lookalikes import lookalike_records
from libortho.scenario import RECORD_TEMPLATES, public_corpus

DOCS = Path(__file__).resolve().parents[1] / "docs"


def forget_texts() -> list[str]:
    return [r.text for kind, fmt in (("digits", "digits:6"), ("hex", "hex:8"))
            for r in lookalike_records(RECORD_TEMPLATES[kind], fmt, 24, seed=1)]


def time_once(forget: bool, calib: str, calib_tokens: int) -> float:
    model, tok = sources.load_model(None)
    public = sources.load_model(None)[0] if forget else None
    config = OrthoConfig(**PRESETS["privacy"], calib_tokens=calib_tokens,
                         forget_source="lookalikes" if forget else "none")
    torch.manual_seed(0)
    stats = decompose(model, tok, calib, config, progress=False, public_model=public,
                      forget_texts=forget_texts() if forget else None)
    return stats.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    calib = public_corpus("calibration")
    runs = {"plain GPTQ": [], "forget objective": []}
    for _ in range(args.repeats):
        runs["plain GPTQ"].append(time_once(False, calib, args.calib_tokens))
        runs["forget objective"].append(time_once(True, calib, args.calib_tokens))
    medians = {name: statistics.median(v) for name, v in runs.items()}
    result = dict(
        what="decompose() seconds, SmolLM2-135M, privacy preset (GPTQ INT4 g64, 2 % ortho), "
             f"{args.calib_tokens} calibration tokens; forget objective on 48 look-alike texts",
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), runs=runs, median_seconds=medians,
        ratio=medians["forget objective"] / medians["plain GPTQ"],
    )
    (DOCS / "decompose_forget_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
