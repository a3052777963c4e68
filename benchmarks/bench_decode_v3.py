"""One GPU command for kernel v3 (libortho/kernels/tc.py, 2–64 token rows): correctness
first, then a short tuning race and the layer benchmark, each step logged, every result
written under --out.

    python3 benchmarks/bench_decode_v3.py --out $OUT [--budget-s 420] [--procs 14]

Steps (each a subprocess with its own time limit; a step that fails or overruns is logged and
the next one still runs; Triton compile errors inside a step are caught per case / trial /
row):

1. check: ``tests/gpu/test_kernels_gpu.py`` (every case, the ``tc …`` cases included, with
   LIBORTHO_KERNEL_V3=1 so that the default-dispatch cases run what v3 would) in --procs
   parallel parts (compiling dominates) -> check.json. It always gets its own time:
   max(60 s, min(120 s, 22 % of the budget)), 92 s at the default 420 s.
2. warm: the tune's trials and the benchmark's libortho rows called once in parallel
   processes, so that the timed steps find their kernels in Triton's cache.
3. tune: ``libortho.kernel_bench --tune-tc`` (previous path vs ``candidate_configs_tc`` per
   shape and M in 2..64, alpha 1, 1 % ortho) -> tc_configs.json (copy it over
   libortho/kernels/tc_configs.json to ship it).
4. bench: ``libortho.kernel_bench --v3`` with that table on the six shapes, M = 1, 2, 4, 8,
   16, 32, 64: fp16 (F.linear), torch_int4 (tinygemm), a0, a1_1, a1_2, a1_lr (1 % + rank 64,
   fused), a1_1_rows (per-row alpha) and the same with v3 off (*_prev) -> bench.json
   (medians of 100 CUDA-event-timed graph replays).

Every step has a minimum time (``MIN_S``); the later steps share what the budget leaves,
each at least its minimum, so a small --budget-s makes the run overrun rather than starve a
step; a step with no time left is reported as such (warm and tune may then be skipped:
the bench falls back to the shipped tc table).

The summary prints the goals (libortho.kernel_bench.report.GOALS) from bench.json. A goal
is printed MET only when the check of the same run passed (every case, and at least one
case on the tc kernel's fp16 path); otherwise "UNVERIFIED" stands where MET would, and
verdict.json records why.
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
ROWS = ("fp16,torch_int4,a0,a1_1,a1_2,a1_lr,a1_1_rows,a0_prev,a1_1_prev,a1_2_prev,"
        "a1_lr_prev")
# Time limits per step (s). The check always gets max(MIN, min(MAX, CHECK_SHARE · budget)).
MIN_S = dict(check=60.0, warm=30.0, tune=40.0, bench=60.0)
MAX_S = dict(check=120.0, warm=75.0, tune=90.0)
CHECK_SHARE = 0.22
_LOG = None


def log(s: str) -> None:
    print(s, flush=True)
    if _LOG:
        _LOG.write(s + "\n")
        _LOG.flush()


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", **extra)


def check_limit(budget_s: float) -> float:
    """The check's time limit: its share of the budget, never below MIN_S["check"]."""
    return max(MIN_S["check"], min(MAX_S["check"], CHECK_SHARE * budget_s))


def step_limit(name: str, left: float, reserve: float = 0.0) -> float:
    """Time limit of one step: what the budget leaves after ``reserve`` (the later steps'
    minimums), clamped to [MIN_S, MAX_S]. Says so when the budget leaves less than the
    minimum (the step still gets its minimum; the run overruns --budget-s)."""
    avail = left - reserve
    lim = max(MIN_S[name], min(MAX_S.get(name, float("inf")), avail))
    if avail < MIN_S[name]:
        log(f"== {name}: the budget leaves {max(0.0, avail):.0f} s (after {reserve:.0f} s kept "
            f"for the later steps); it gets its minimum {MIN_S[name]:.0f} s, so the run will "
            f"overrun --budget-s")
    return lim


def step(name: str, cmd: list, logs: str, limit: float, env: dict = None) -> int:
    t0 = time.time()
    log(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}")
    with open(os.path.join(logs, f"{name}.log"), "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=env or _env(), timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    log(f"== {name}: rc {rc} in {time.time() - t0:.0f} s"
        + (" (TIMED OUT: its results are partial or missing)" if rc == 124 else ""))
    return rc


def parallel(name: str, cmds: list, logs: str, limit: float, env: dict = None) -> list:
    t0 = time.time()
    log(f"== {name}: {len(cmds)} processes (limit {limit:.0f} s)")
    procs = []
    for i, cmd in enumerate(cmds):
        f = open(os.path.join(logs, f"{name}{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                       env=env or _env()), f))
    rcs = []
    for p, f in procs:
        try:  # one deadline for all: each waits for what is left of the step's limit
            rcs.append(p.wait(timeout=max(0.1, limit - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rcs.append(124)
        f.close()
    late = [i for i, rc in enumerate(rcs) if rc == 124]
    log(f"== {name}: rcs {rcs} in {time.time() - t0:.0f} s"
        + (f" (parts {late} TIMED OUT after {limit:.0f} s)" if late else ""))
    return rcs


def check_verdict(c) -> tuple:
    """(verified, reason) from a check.json: verified when every case passed and at least
    one case ran the tc kernel on its fp16 (inline PTX) path."""
    if not c:
        return False, "no check.json (check skipped or crashed)"
    cases = c.get("cases", [])
    bad = [x["name"] for x in cases if not x.get("ok")]
    h2 = [x["name"] for x in cases if x.get("tc_h2")]
    if not cases:
        return False, "the check ran no case"
    if bad:
        return False, f"{len(bad)} of {len(cases)} check cases failed or did not run"
    if not h2:
        return False, "no check case ran the tc kernel's fp16 path"
    return True, f"{len(cases)}/{len(cases)} check cases passed, {len(h2)} on the tc fp16 path"


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
            for kind in ("a0", "a1_1", "a1_2", "lr", "rows"):
                items.append((n, k, m, kind, None, True))
                if m > 1 and kind != "rows":
                    items.append((n, k, m, kind, None, False))  # the *_prev rows
            if m > 1:
                for c in B.tuning.tc_trials(m, n, k):
                    items.append((n, k, m, "a1_1", c, True))
                    for kind in ("a0", "a1_2", "lr", "rows"):  # the bench runs the winner
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
        lay = cache[(n, k)]["a1_1" if kind == "rows" else kind]
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        alpha = (torch.rand(m, device="cuda") if kind == "rows"
                 else 0.0 if kind == "a0" else 1.0)
        dispatch.set_v3(v3)
        try:
            dual_stream_linear(x, lay, alpha, config=cfg, lowrank=kind == "lr")
            torch.cuda.synchronize()
        except Exception as exc:  # the timed step reports it again
            print(f"warm {n}x{k} m{m} {kind} v3={v3} {cfg}: {exc!r}"[:3000], flush=True)
    print(f"warm done: {len(mine)} calls", flush=True)
    return 0


def summary(out: str) -> None:
    """Print the check, the tune's winners, the bench table and the goals; write
    verdict.json (whether the check passed, and each goal's status)."""
    def load(name):
        try:
            with open(os.path.join(out, name)) as f:
                return json.load(f)
        except Exception:
            return None
    c = load("check.json")
    verified, why = check_verdict(c)
    if c:
        bad = [x["name"] for x in c["cases"] if not x["ok"]]
        tc = [x for x in c["cases"] if x["name"].startswith("tc")]
        log(f"\ncheck: {len(c['cases']) - len(bad)}/{len(c['cases'])} ok on {c.get('device')}; "
            f"failed: {bad}; tc cases {sum(x['ok'] for x in tc)}/{len(tc)} "
            f"({sum(bool(x.get('tc_h2')) for x in tc)} on the fp16 path), errs "
            + " ".join(f"{x['err']:.1e}" for x in tc))
    log(f"check verdict: {'VERIFIED' if verified else 'NOT VERIFIED'}: {why}")
    t = load("tc_configs.json")
    if t:
        for e in t.get("entries", []):
            cfg = e["config"]
            prev = e["trials"][0]["us"] if e.get("trials") else float("nan")
            log(f"tune {e['n']}x{e['k']} m{e['m']}: prev {prev:.1f} -> {e['us_alpha1']:.1f} us "
                f"{cfg['kernel']} BM{cfg.get('BM')} BN{cfg.get('BN')} w{cfg.get('num_warps')} "
                f"st{cfg.get('STAGES', '-')} sp{cfg.get('SPLIT')}"
                + (f"; alpha 0: prev {e['trials_alpha0'][0]['us']:.1f} -> {e['us_alpha0']:.1f} us "
                   f"{e['config_base_only']['kernel']}" if e.get("config_base_only") else ""))
    b = load("bench.json")
    status = []
    if b:
        log(f"\nbench ({b['env']['device']}, copy {b['copy_gbps']:.0f} GB/s, "
            f"kernel v3 {'on' if b['env'].get('kernel_v3') else 'off'}, "
            f"partial={b.get('partial', False)}):")
        rows = {}
        for r in b["results"]:
            rows.setdefault((r["n"], r["k"], r["m"]), {})[r["row"]] = r.get("us")
        cols = ROWS.split(",")
        log("  N×K M | " + " | ".join(cols))
        for key in sorted(rows):
            log(f"  {key[0]}x{key[1]} {key[2]} | " + " | ".join(
                f"{rows[key][c]:.1f}" if rows[key].get(c) else "-" for c in cols))
        if not verified:
            log(f"  goals: UNVERIFIED stands where MET would: the check did not pass ({why})")
        for g in b.get("goals", []):
            st = "MISS" if not g["met"] else "MET " if verified else "UNVERIFIED"
            status.append(dict(g, status=st.strip()))
            log(f"  {st} {g['goal']} {g['n']}x{g['k']} m{g['m']}: {g['value']:.3f} "
                f"({g.get('cmp', '')} {g.get('limit', float('nan')):.3f})")
    with open(os.path.join(out, "verdict.json"), "w") as f:
        json.dump(dict(verified=verified, reason=why, goals=status), f, indent=1)


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
    left = lambda: t_end - time.time()  # noqa: E731
    need = sum(MIN_S[s] for s in MIN_S if s not in skip)
    log(f"bench_decode_v3 start {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, "
        f"budget {args.budget_s:.0f} s (step minimums {need:.0f} s"
        + (": the budget is below them, the run will overrun it" if need > args.budget_s else "")
        + ")")
    v3_env = _env(LIBORTHO_KERNEL_V3="1")
    if "check" not in skip:
        lim = check_limit(args.budget_s)
        parallel("check", [[py, "tests/gpu/test_kernels_gpu.py", "--part", f"{i}/{P}",
                            "--json", f"{logs}/check{i}.json"] for i in range(P)], logs, lim,
                 env=v3_env)
        cases, dev = [], None
        for i in range(P):
            try:
                with open(f"{logs}/check{i}.json") as f:
                    d = json.load(f)
                cases += d["cases"]
                dev = d["device"]
                done = d.get("complete", True)
            except Exception:
                done = False
            if not done:  # killed on time or crashed: its finished cases are kept above
                cases.append(dict(name=f"part {i} (did not finish: timeout or crash, see "
                                  f"logs/check{i}.log)", ok=False, err=float("nan")))
        with open(f"{out}/check.json", "w") as f:
            json.dump(dict(device=dev, cases=cases), f, indent=1)
        log(f"== check verdict: {check_verdict(dict(cases=cases))[1]}")
    else:
        log("== check: SKIPPED (--skip): goals cannot be MET in this run")
    later = lambda *steps: sum(MIN_S[s] for s in steps if s not in skip)  # noqa: E731
    if "warm" not in skip:
        if left() - later("tune", "bench") < MIN_S["warm"]:
            log(f"== warm: SKIPPED, no time left ({max(0.0, left()):.0f} s of the budget, "
                f"{later('tune', 'bench'):.0f} s kept for tune and bench): the timed steps "
                f"compile as they go")
        else:
            parallel("warm", [[py, me, "--out", out, "--warm", f"{i}/{P}"] for i in range(P)],
                     logs, step_limit("warm", left(), later("tune", "bench")))
    tc_table = os.path.join(out, "tc_configs.json")
    shapes = ",".join(f"{n}x{k}" for n, k in SHAPES)
    if "tune" not in skip:
        if left() - later("bench") < MIN_S["tune"]:
            log(f"== tune: SKIPPED, no time left ({max(0.0, left()):.0f} s of the budget, "
                f"{later('bench'):.0f} s kept for the bench): the bench uses the shipped table "
                f"libortho/kernels/tc_configs.json")
        else:
            lim = step_limit("tune", left(), later("bench"))
            step("tune", [py, "-m", "libortho.kernel_bench", "--tune-tc", "--tune-only",
                          "--shapes", shapes, "--tune-batches", ",".join(map(str, TC_M)),
                          "--tune-tc-budget-s", f"{max(10.0, lim - 25):.0f}",
                          "--save-tc-configs", tc_table], logs, lim)
    if "bench" not in skip:
        cmd = [py, "-m", "libortho.kernel_bench", "--v3", "--shapes", shapes,
               "--batches", "1,2,4,8,16,32,64", "--rows", ROWS, "--json", f"{out}/bench.json"]
        if os.path.exists(tc_table):
            cmd += ["--tc-configs", tc_table]
        step("bench", cmd, logs, step_limit("bench", left() - 5))
    summary(out)
    log(f"bench_decode_v3 end {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
