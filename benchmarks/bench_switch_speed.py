"""Alpha 1 against alpha 0 at batch 1 on a real model: the decode latency of the built-in SmolLM2-135M,
decomposed with a two-part ortho stream (what the switch costs per token), in fp16 on a GPU.

The model runs as `libortho generate` runs it: transformers' eager decode loop, one token per forward,
with the layers' CUDA path (the fused INT4 kernel with the sparse part, then the low-rank part's two
thin GEMMs). At 135M parameters a step is launch-bound, so the ratio alpha 1 / alpha 0 is what this
measures, not bandwidth. Values do not matter for speed: the decomposition uses a short calibration.

    python benchmarks/bench_switch_speed.py [--ortho-budget 0.25] [--lowrank-share 1.0] [--tokens 64]
        [--reps 5] [--json docs/switch_speed.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from libortho import sources
from libortho.config import preset
from libortho.decompose import decompose
from libortho.switch import alpha


def decode_ms_per_token(model, ids: torch.Tensor, tokens: int) -> float:
    """Wall ms per new token of one greedy decode with the KV cache (the caller takes the median)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ortho-budget", type=float, default=None, help="default: the privacy preset's")
    ap.add_argument("--lowrank-share", type=float, default=None, help="default: the privacy preset's")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    privacy = preset("privacy", forget_source="records")
    budget = privacy.ortho_budget if args.ortho_budget is None else args.ortho_budget
    share = privacy.lowrank_share if args.lowrank_share is None else args.lowrank_share
    model, tok = sources.load_model(None)
    calib = " ".join(["The quick brown fox jumps over the lazy dog."] * 400)
    config = preset("quality", group_size=privacy.group_size, calib_tokens=2048, ortho_budget=budget, lowrank_share=share)
    stats = decompose(model, tok, calib, config, progress=False)
    model = model.to("cuda", torch.float16).eval()
    ids = tok("Account 4821 of Ada Lovelace has PIN", return_tensors="pt").input_ids.cuda()
    rows = {}
    for a in (0.0, 1.0, 0.0, 1.0):  # interleaved, so drift hits both
        with alpha(model, a):
            decode_ms_per_token(model, ids, 8)  # warm-up
            times = [decode_ms_per_token(model, ids, args.tokens) for _ in range(args.reps)]
        rows.setdefault(f"alpha_{a:g}", []).extend(times)
    out = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               ortho_budget=budget, lowrank_share=share, ortho_bytes=stats.ortho_bytes, tokens=args.tokens,
               ms_per_token={k: statistics.median(v) for k, v in rows.items()}, runs=rows)
    out["alpha1_over_alpha0"] = out["ms_per_token"]["alpha_1"] / out["ms_per_token"]["alpha_0"]
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
