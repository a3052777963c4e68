"""Time and peak device memory of one layer's fits, stage by stage, at Llama layer shapes.

For each [out, in] shape: the Hessian accumulation (2XᵀX/n over `--tokens` calibration tokens), the forget
objective's W* (forget.py: Cholesky of H' and a solve), the upper Cholesky factor of H'⁻¹ and GPTQ's column
loop (quantize.py), and the privacy preset's low-rank fit (lowrank.weighted_svd: float64 eigh of H and SVD of
the whitened residual). Random W and X; these stages' cost depends on the shapes only. Median of --repeat runs.

    python benchmarks/fit_stage_costs.py --device cuda --shapes 8b [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from libortho.config import preset
from libortho.forget import ForgetObjective
from libortho.lowrank import rank_for_bytes, weighted_svd
from libortho.ortho_split import base_bytes
from libortho.quantize import gptq, hinv_upper

SHAPES = {  # the distinct [out, in] of one decoder block (q/k/v and gate/up share their input)
    "1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],
    "8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "70b": [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def layer_costs(out: int, n_in: int, tokens: int, device: torch.device, repeat: int) -> dict:
    config = preset("privacy", forget_source="lookalikes")
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(tokens, n_in, generator=g, device=device)
    Xp = torch.randn(max(1, tokens // 64), n_in, generator=g, device=device)
    W = torch.randn(out, n_in, generator=g, device=device) * 0.02
    W_P = W + 1e-3 * torch.randn(out, n_in, generator=g, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = dict(out=out, n_in=n_in, tokens=tokens)
    row["hessian_s"], H = _timed(lambda: 2 * X.t() @ X / tokens, device, repeat)
    H_priv = 2 * Xp.t() @ Xp / Xp.shape[0]
    row["forget_target_s"], fit = _timed(lambda: ForgetObjective(config).fit(W, W_P, H, H_priv), device, repeat)
    row["hinv_s"], U = _timed(lambda: hinv_upper(fit.H, config.damp), device, repeat)
    row["gptq_s"], base = _timed(lambda: gptq(fit.W, fit.H, config.quant_spec, config.damp, config.gptq_block_size,
                                              Hinv_upper=U), device, repeat)
    rank = rank_for_bytes(out, n_in, int(config.ortho_budget * base_bytes((out, n_in), config.bits, config.group_size)))
    R = W - base.dequantize()
    row["rank"] = rank
    row["lowrank_fit_s"], _ = _timed(lambda: weighted_svd(R, fit.H_sieve, rank, config.damp), device, min(repeat, 2))
    row["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", choices=list(SHAPES), default="1b")
    ap.add_argument("--tokens", type=int, default=preset("privacy").calib_tokens)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for out, n_in in SHAPES[args.shapes]:
        rows.append(layer_costs(out, n_in, args.tokens, device, args.repeat))
        print(json.dumps(rows[-1]), flush=True)
    result = dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  torch=torch.__version__, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d %H:%M"),
                  shapes=args.shapes, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
