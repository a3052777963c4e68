"""One GPU command for kernel v3 (libortho/kernels/tc.py, 2–64 token rows): correctness, a short
tuning race, and the layer benchmark, each step logged, every result written under --out.

    python3 benchmarks/bench_decode_v3.py --out $OUT [--budget-s 420] [--procs 14]

Steps (each a subprocess with its own time limit; a step that fails or overruns is logged and
the next one still runs; Triton compile errors inside a step are caught per case / trial /
row):

1. check: ``tests/gpu/test_kernels_gpu.py`` (every case, the ``tc …`` cases included) in
   --procs parallel parts (compiling dominates) -> check.json.
2. warm: the tune's trials and the benchmark's libortho rows called once in parallel
   processes, so that the timed steps find their kernels in Triton's cache.
3. tune: ``libortho.kernel_bench --tune-tc`` (previous path vs ``candidate_configs_tc`` per
   shape and M in 2..64, alpha 1, 1 % ortho) -> tc_configs.json (copy it over
   libortho/kernels/tc_configs.json to ship it).
4. bench: ``libortho.kernel_bench`` with that table on the six shapes, M = 1, 2, 4, 8, 16,
   32, 64: fp16 (torch.matmul / F.linear), torch_int4 (tinygemm), a0, a1_1, a1_2, a1_lr
   (1 % + rank 64, fused) and the same with v3 off (*_prev) -> bench.json (medians of 100
   CUDA-event-timed graph replays).
Logs: run.log (this driver) and logs/*.log.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (8192, 8192)]
TC_M = (2, 4, 8, 16, 32, 64)
ROWS = "fp16,torch_int4,a0,a1_1,a1_2,a1_lr,a0_prev,a1_1_prev,a1_2_prev,a1_lr_prev"
_LOG = None


def log(s: str) -> None:
    print(s, flush=True)
    if _LOG:
        _LOG.write(s + "\n")
        _LOG.flush()


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def step(name: str, cmd: list, logs: str, limit: float) -> int:
    t0 = time.time()
    log(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}")
    with open(os.path.join(logs, f"{name}.log"), "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(),
                                timeout=max(1.0, limit)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    log(f"== {name}: rc {rc} in {time.time() - t0:.0f} s")
    return rc


def parallel(name: str, cmds: list, logs: str, limit: float) -> list:
    t0 = time.time()
    log(f"== {name}: {len(cmds)} processes (limit {limit:.0f} s)")
    procs = []
    for i, cmd in enumerate(cmds):
        f = open(os.path.join(logs, f"{name}{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                       env=_env()), f))
    rcs = []
    for p, f in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, limit - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rcs.append(124)
        f.close()
    log(f"== {name}: rcs {rcs} in {time.time() - t0:.0f} s")
    return rcs


def warm(part: int, parts: int) -> int:
    """Call every libortho variant the tune and the bench will time once (this process's
    share), so that they compile here, in parallel, into Triton's on-disk cache."""
    import torch
    from libortho import kernel_bench as B
    from libortho.kernel_bench.layers import LR_RANK
    from libortho.kernels import dispatch, dual_stream_linear
    items = []
    for n, k in SHAPES:
        for m in (1,) + TC_M:
            for kind in ("a0", "a1_1", "a1_2", "lr"):
                items.append((n, k, m, kind, None, True))
                if m > 1:
                    items.append((n, k, m, kind, None, False))  # the *_prev rows
            if m > 1:
                for c in B.tuning.tc_trials(m, n, k):
                    items.append((n, k, m, "a1_1", c, True))
                    for kind in ("a0", "a1_2", "lr"):  # the bench runs the winner on these
                        if c["kernel"] == "tc":
                            items.append((n, k, m, kind, c, True))
    mine = items[part::parts]
    cache = {}
    for n, k, m, kind, cfg, v3 in mine:
        if (n, k) not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            b = B.base_layers(n, k, 1, seed=1)[0]
            d1, d2 = B.with_ortho(b, 0.01, seed=2), B.with_ortho(b, 0.02, seed=3)
            cache[(n, k)] = dict(a0=b, a1_1=d1, a1_2=d2, lr=B.operands.with_lowrank(d1, LR_RANK, 4))
        lay = cache[(n, k)][kind]
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        dispatch.V3_ENABLED = v3
        try:
            dual_stream_linear(x, lay, 0.0 if kind == "a0" else 1.0, config=cfg,
                               lowrank=kind == "lr")
            torch.cuda.synchronize()
        except Exception as exc:  # the timed step reports it again
            print(f"warm {n}x{k} m{m} {kind} v3={v3} {cfg}: {exc!r}"[:3000], flush=True)
    print(f"warm done: {len(mine)} calls", flush=True)
    return 0


def summary(out: str) -> None:
    def load(name):
        try:
            with open(os.path.join(out, name)) as f:
                return json.load(f)
        except Exception:
            return None
    c = load("check.json")
    if c:
        bad = [x["name"] for x in c["cases"] if not x["ok"]]
        tc = [x for x in c["cases"] if x["name"].startswith("tc")]
        log(f"\ncheck: {len(c['cases']) - len(bad)}/{len(c['cases'])} ok on {c.get('device')}; "
            f"failed: {bad}; tc cases {sum(x['ok'] for x in tc)}/{len(tc)}, errs "
            + " ".join(f"{x['err']:.1e}" for x in tc))
    t = load("tc_configs.json")
    if t:
        for e in t.get("entries", []):
            cfg = e["config"]
            prev = e["trials"][0]["us"] if e.get("trials") else float("nan")
            log(f"tune {e['n']}x{e['k']} m{e['m']}: prev {prev:.1f} -> {e['us_alpha1']:.1f} us "
                f"{cfg['kernel']} BM{cfg.get('BM')} BN{cfg.get('BN')} w{cfg.get('num_warps')} "
                f"st{cfg.get('STAGES', '-')} sp{cfg.get('SPLIT')}")
    b = load("bench.json")
    if b:
        log(f"\nbench ({b['env']['device']}, copy {b['copy_gbps']:.0f} GB/s, "
            f"partial={b.get('partial', False)}):")
        rows = {}
        for r in b["results"]:
            rows.setdefault((r["n"], r["k"], r["m"]), {})[r["row"]] = r.get("us")
        cols = ROWS.split(",")
        log("  N×K M | " + " | ".join(cols))
        for key in sorted(rows):
            log(f"  {key[0]}x{key[1]} {key[2]} | " + " | ".join(
                f"{rows[key][c]:.1f}" if rows[key].get(c) else "-" for c in cols))
        for g in b.get("goals", []):
            log(f"  {'MET ' if g['met'] else 'MISS'} {g['goal']} {g['n']}x{g['k']} "
                f"m{g['m']}: {g['value']:.3f}")


def main() -> int:
    global _LOG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="results directory (JSON + logs)")
    ap.add_argument("--budget-s", type=float, default=420, help="wall budget of all steps")
    ap.add_argument("--procs", type=int, default=14, help="parallel compile processes")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: check,warm,tune,bench")
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)  # i/P (internal)
    args = ap.parse_args()
    if args.warm:
        i, p = (int(v) for v in args.warm.split("/"))
        return warm(i, p)
    t_end = time.time() + args.budget_s
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    _LOG = open(os.path.join(out, "run.log"), "a")
    skip = set(filter(None, args.skip.split(",")))
    py, me, P = sys.executable, os.path.abspath(__file__), args.procs
    left = lambda reserve: t_end - time.time() - reserve  # noqa: E731
    log(f"bench_decode_v3 start {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, "
        f"budget {args.budget_s:.0f} s")
    if "check" not in skip:
        parallel("check", [[py, "tests/gpu/test_kernels_gpu.py", "--part", f"{i}/{P}",
                            "--json", f"{logs}/check{i}.json"] for i in range(P)], logs,
                 min(110, left(290)))
        cases, dev = [], None
        for i in range(P):
            try:
                with open(f"{logs}/check{i}.json") as f:
                    d = json.load(f)
                cases += d["cases"]
                dev = d["device"]
            except Exception:
                cases.append(dict(name=f"part {i} (no result: timeout or crash, see "
                                  f"logs/check{i}.log)", ok=False, err=float("nan")))
        with open(f"{out}/check.json", "w") as f:
            json.dump(dict(device=dev, cases=cases), f, indent=1)
    if "warm" not in skip:
        parallel("warm", [[py, me, "--out", out, "--warm", f"{i}/{P}"] for i in range(P)], logs,
                 min(80, left(200)))
    tc_table = os.path.join(out, "tc_configs.json")
    shapes = ",".join(f"{n}x{k}" for n, k in SHAPES)
    if "tune" not in skip:
        lim = min(90, left(110))
        step("tune", [py, "-m", "libortho.kernel_bench", "--tune-tc", "--tune-only",
                      "--shapes", shapes, "--tune-batches", ",".join(map(str, TC_M)),
                      "--tune-tc-budget-s", f"{max(10.0, lim - 25):.0f}",
                      "--save-tc-configs", tc_table], logs, lim)
    if "bench" not in skip:
        cmd = [py, "-m", "libortho.kernel_bench", "--shapes", shapes,
               "--batches", "1,2,4,8,16,32,64", "--rows", ROWS, "--json", f"{out}/bench.json"]
        if os.path.exists(tc_table):
            cmd += ["--tc-configs", tc_table]
        step("bench", cmd, logs, max(30.0, left(5)))
    summary(out)
    log(f"bench_decode_v3 end {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
