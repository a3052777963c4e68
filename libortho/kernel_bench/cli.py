"""``libortho bench`` options and driver: optional tuning, then the layer benchmark over the
requested shapes, printed as tables and goals (and written as JSON)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence, Tuple

import torch

from .layers import BATCHES, DENSITIES, SHAPES, bench_shape, split_for_shape
from .report import environment, format_tables, goals
from .timing import copy_bandwidth
from .tuning import tune, tune_tc


def _parse_shapes(text: str) -> List[Tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, k = part.lower().split("x")
        out.append((int(n), int(k)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``libortho bench``."""
    parser.add_argument("--json", default=None, help="write all rows, goals and the "
                        "environment to this JSON file")
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                        help="comma-separated OUTxIN layer shapes (default: the six benchmark "
                        "shapes)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="comma-separated token-row counts (default 1,2,4,8,16,32,64)")
    parser.add_argument("--reps", type=int, default=100, help="timed graph replays (>= 100)")
    parser.add_argument("--rows", default="fp16,torch_int4,a0,a1,a1_1_rows,naive_1,a1_lr",
                        help="which rows to run (also: a0_prev, a1_1_prev, a1_2_prev, "
                        "a1_lr_prev: kernel v3 switched off)")
    parser.add_argument("--v3", action="store_true",
                        help="switch kernel v3 (tc, 2 <= M <= 64) on for the libortho rows "
                        "even where LIBORTHO_KERNEL_V3=0 switched it off (it is on by "
                        "default; the *_prev rows switch it off)")
    parser.add_argument("--tune-tc", action="store_true",
                        help="race kernel v3 (tc) configs against the previous path for "
                        "2 <= M <= 64 first (alpha = 1, 1 %% ortho) and use the winners")
    parser.add_argument("--tune-tc-budget-s", type=float, default=None,
                        help="with --tune-tc: stop tuning new shapes after this many seconds")
    parser.add_argument("--save-tc-configs", default=None,
                        help="with --tune-tc: write the tc table (JSON) here")
    parser.add_argument("--tc-configs", default=None, help="load a tc config table (JSON)")
    parser.add_argument("--tune", action="store_true",
                        help="sweep tile configs per shape first and use the fastest")
    parser.add_argument("--tune-extra-shapes", default="",
                        help="with --tune: more OUTxIN shapes to tune (not benchmarked), "
                        "e.g. the fused qkv/gate_up shapes of the end-to-end model")
    parser.add_argument("--save-configs", default=None,
                        help="with --tune: write the tuned table (JSON) here")
    parser.add_argument("--configs", default=None, help="load a tuned config table (JSON)")
    parser.add_argument("--tune-v2", action="store_true",
                        help="with --tune: only race the v2 decode kernel (M <= 16) against "
                        "the loaded table's entries; other M keep the table's entries")
    parser.add_argument("--tune-batches", default=None,
                        help="with --tune: token-row counts to tune (default: --batches)")
    parser.add_argument("--tune-only", action="store_true",
                        help="with --tune: stop after tuning (and --save-configs)")
    parser.add_argument("--ortho-budget", type=float, default=None, metavar="FRACTION",
                        help="adds rows a0_split / a1_split: OrthoLinear with a two-part ortho stream "
                        "of this fraction of each layer's INT4 bytes (0.25 = 25 %%), split as "
                        "--lowrank-share says")
    parser.add_argument("--lowrank-share", type=float, default=None, metavar="SHARE",
                        help="with --ortho-budget: the low-rank part's share of its bytes "
                        "(default: the privacy preset's)")
    parser.add_argument("--lowrank-bits", type=int, choices=(16, 8, 4), default=None,
                        help="with --ortho-budget: how L is stored, fp16 factors (16) or integer codes "
                        "(8, 4) at the rank the bytes buy (default: the privacy preset's)")
    parser.add_argument("--baseline-configs", default=None,
                        help="a second config table: adds rows a0_base / a1_1_base timed with "
                        "it (before/after in one run on one card)")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; prints tables and goals, returns a process exit code."""
    if not torch.cuda.is_available():
        print("libortho bench needs a CUDA GPU", file=sys.stderr)
        return 2
    from libortho.kernels import available, configs, dispatch
    if not available():
        print("libortho bench needs Triton (pip install triton)", file=sys.stderr)
        return 2
    if args.v3:
        dispatch.set_v3(True)
    torch.manual_seed(0)
    shapes = _parse_shapes(args.shapes)
    batches = [int(b) for b in args.batches.split(",")]
    rows_wanted = args.rows.split(",")
    env = environment()
    env["kernel_v3"] = dispatch.V3_ENABLED
    print(f"device: {env['device']} ({env['sms']} SMs), torch {env['torch']}, "
          f"triton {env['triton']}, kernel v3 {'on' if dispatch.V3_ENABLED else 'off'}",
          flush=True)

    def log(s: str) -> None:
        print(s, flush=True)

    if args.configs:
        configs.load_table(args.configs)
    if args.tc_configs:
        configs.load_tc_table(args.tc_configs)
    if args.tune_tc:
        log("tuning kernel v3 (tc) ...")
        tb = [int(b) for b in args.tune_batches.split(",")] if args.tune_batches else batches
        entries = tune_tc(shapes, tb, log, budget_s=args.tune_tc_budget_s)
        configs.set_tc_table(entries)
        if args.save_tc_configs:
            configs.save_table(args.save_tc_configs, entries, dict(
                device=env["device"], torch=env["torch"], triton=env["triton"], date=env["date"],
                note="kernel v3 table: fastest of libortho.kernel_bench.tc_trials (previous path "
                     "and candidate_configs_tc) at alpha=1, 1% ortho, fp16, g=128"))
        if args.tune_only:
            return 0
    tuned = None
    if args.tune:
        log("tuning ...")
        extra = _parse_shapes(args.tune_extra_shapes) if args.tune_extra_shapes else []
        tb = [int(b) for b in args.tune_batches.split(",")] if args.tune_batches else batches
        tuned = tune(shapes + [s for s in extra if s not in shapes], tb, log,
                     v2_only=args.tune_v2)
        note = ("fastest of libortho.kernel_bench.candidate_configs at alpha=1, 1% ortho, fp16, g=128"
                if not args.tune_v2 else
                "M in %s: fastest of the previous entry and libortho.kernel_bench.candidate_configs_v2 "
                "(alpha=1, 1%% ortho, fp16, g=128); other M: previous table" % tb)
        info = dict(device=env["device"], torch=env["torch"], triton=env["triton"],
                    date=env["date"], note=note)
        if args.tune_v2:  # keep the previous entries of every (M, N, K) not re-tuned
            done = {(e["m"], e["n"], e["k"]) for e in tuned}
            for (n_, k_), rows in configs.TABLE.items():
                for m_, c_ in rows:
                    if (m_, n_, k_) not in done:
                        tuned.append(dict(m=m_, n=n_, k=k_, config=c_))
            tuned.sort(key=lambda e: (e["n"], e["k"], e["m"]))
        configs.set_table(tuned, info)
        if args.save_configs:
            configs.save_table(args.save_configs, tuned, info)
        if args.tune_only:
            return 0
    baseline = configs.read_table(args.baseline_configs) if args.baseline_configs else None
    bw = copy_bandwidth()
    log(f"copy bandwidth: {bw:.0f} GB/s (read + write)")
    results: List[dict] = []
    for n, k in shapes:
        split = None
        if args.ortho_budget is not None:
            from libortho.config import PRESETS
            share = PRESETS["privacy"]["lowrank_share"] if args.lowrank_share is None else args.lowrank_share
            lr_bits = PRESETS["privacy"]["lowrank_bits"] if args.lowrank_bits is None else args.lowrank_bits
            split = split_for_shape(n, k, args.ortho_budget, share, lowrank_bits=lr_bits)
            log(f"  N={n:5d} K={k:5d} split at {args.ortho_budget:g} of the base's bytes: "
                f"sparse density {split[0]:.4f}, rank {split[1]} ({lr_bits}-bit L)")
        results += bench_shape(n, k, batches, max(100, args.reps), DENSITIES, rows_wanted, log,
                               baseline, split, lr_bits if split else 16)
        if args.json:  # partial results survive a timeout
            with open(args.json, "w") as f:
                json.dump(dict(env=env, copy_gbps=bw, results=results, tuned=tuned,
                               partial=True), f, indent=1)
    g = goals(results, bw)
    table = format_tables(results, bw)
    print("\n" + table + "\n")
    for x in g:
        print(f"{'MET ' if x['met'] else 'MISS'} {x['goal']:62s} N={x['n']} K={x['k']} "
              f"M={x['m']}: {x['value']:.3f} ({x['cmp']} {x['limit']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, copy_gbps=bw, results=results, goals=g, tuned=tuned,
                           table_md=table), f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="libortho bench",
                                     description=sys.modules[__package__].__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
