"""What it costs to open and use a libortho artifact: load time, peak host RSS, GPU memory, greedy decode
speed (transformers' `generate`, batch 1) and perplexity, at each alpha asked for.

Random-weight artifacts (benchmarks/decompose_scale.py) say nothing of quality: their perplexity only
shows that the forward runs end to end at that size.

    python benchmarks/load_artifact.py ARTIFACT --device cuda [--alphas 0 1] [--text FILE] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--text", default=None, help="perplexity text (default: the public calibration corpus)")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    import libortho
    from libortho.evaluation import perplexity

    cuda = args.device.startswith("cuda")
    t0 = time.perf_counter()
    model, tok = libortho.load(args.artifact, alpha=max(args.alphas), device=args.device)
    if cuda:
        torch.cuda.synchronize()
    row = dict(artifact=str(Path(args.artifact).resolve()), device=args.device, load_s=time.perf_counter() - t0,
               rss_after_load_gib=_peak_rss_gib(), gpu_after_load_gib=_gpu_gib(cuda, "allocated"))
    if args.text:
        text = Path(args.text).read_text()
    else:
        from libortho.scenario import public_corpus

        text = public_corpus("calibration")
    ids = tok("The quick brown fox", return_tensors="pt").input_ids.to(args.device)
    for a in args.alphas:
        with libortho.alpha(model, a), torch.inference_mode():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up: kernels compile
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            new = out.shape[1] - ids.shape[1]
            ppl = perplexity(model, tok, text, window=512, max_windows=args.windows)
        row[f"alpha_{a:g}"] = dict(decode_tokens_per_s=new / seconds, ms_per_token=1000 * seconds / new, perplexity=ppl)
    row.update(peak_rss_gib=_peak_rss_gib(), peak_gpu_gib=_gpu_gib(cuda, "peak"), date=time.strftime("%Y-%m-%d %H:%M"),
               machine=platform.node(), gpu=torch.cuda.get_device_name() if cuda else None, torch=torch.__version__)
    print(json.dumps(row, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _gpu_gib(cuda: bool, which: str) -> float | None:
    if not cuda:
        return None
    import torch

    return (torch.cuda.max_memory_allocated() if which == "peak" else torch.cuda.memory_allocated()) / 2**30


if __name__ == "__main__":
    main()
