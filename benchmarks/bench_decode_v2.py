"""One device call for the v2 decode kernel: correctness, v2-vs-table tuning,
end-to-end decode and the layer benchmark, each timed against the config table as it was
(``--baseline`` copy) on the same card in the same run, then a short summary.

    python benchmarks/bench_decode_v2.py --out DIR [--budget-s 400]

Writes DIR/{check,bench,e2e}.json, DIR/tuned_configs.json (the new table) and
DIR/*.log. Steps that would overrun the budget are skipped (partial JSON survives).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def step(name: str, cmd: list, out: str, limit: float) -> int:
    t0 = time.time()
    print(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                               timeout=max(1.0, limit))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print(f"== {name}: rc {rc} in {time.time() - t0:.0f} s", flush=True)
    return rc


def parallel(name: str, cmds: list, out: str, limit: float) -> list:
    """Run several commands at once (compiles are CPU-bound and single-threaded; the GPU
    work of these steps is light and untimed). Returns their exit codes."""
    t0 = time.time()
    print(f"== {name}: {len(cmds)} processes (limit {limit:.0f} s)", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = []
    for i, cmd in enumerate(cmds):
        log = open(os.path.join(out, f"{name}{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env=env), log))
    rcs = []
    for p, log in procs:
        try:
            rcs.append(p.wait(timeout=max(1.0, limit - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rcs.append(124)
        log.close()
    print(f"== {name}: rcs {rcs} in {time.time() - t0:.0f} s", flush=True)
    return rcs


SHAPES = [(8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336), (11008, 4096),
          (4096, 11008), (6144, 4096), (28672, 4096)]


def warm(kind: str, part: int, parts: int, new: str, base: str) -> int:
    """Compile (by calling once on every shape) the kernel variants a later timed step needs,
    this process's share of them. kind "tune": candidate_configs_v2 x SPLIT and the table's
    entries; kind "final": the rows of the benchmark and the decode model with the tuned
    and the baseline tables."""
    import torch
    from libortho import kernel_bench as B
    from libortho.kernels import configs, dual_stream_linear, prepare
    items = []
    if kind == "tune":
        for m in (1, 4, 16):
            items.append((m, "cur", None))
            for ci, c in enumerate(B.candidate_configs_v2(m)):
                items.append((m, "v2", c))
    else:
        for m in (1, 4, 16):
            for r in ("a0", "a1_0.5", "a1_1", "a1_2", "rows", "base"):
                items.append((m, r, None))
    mine = items[part::parts]
    if not mine:
        return 0
    configs.load_table(new if kind == "final" else configs.TABLE_PATH)
    bt = configs.read_table(base)
    for n, k in SHAPES:
        b = B.base_layers(n, k, 1, seed=1)[0]
        dl = {d: B.with_ortho(b, d, seed=2) for d in (0.005, 0.01, 0.02)}
        for lay in [b, *dl.values()]:
            prepare(lay)
        for m, r, c in mine:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            try:
                if r == "cur":
                    dual_stream_linear(x, dl[0.01], 1.0)
                elif r == "v2":
                    for sp in (1, 2, 4, 8, 16):
                        dual_stream_linear(x, dl[0.01], 1.0, config=dict(c, SPLIT=sp))
                elif r == "a0":
                    dual_stream_linear(x, b, 0.0)
                elif r.startswith("a1_"):
                    dual_stream_linear(x, dl[float(r[3:]) / 100], 1.0)
                elif r == "rows":
                    dual_stream_linear(x, dl[0.01], torch.rand(m, device="cuda"))
                elif r == "base":
                    bc = configs.select_config(m, n, k, 128, table=bt)
                    dual_stream_linear(x, b, 0.0, config=bc)
                    dual_stream_linear(x, dl[0.01], 1.0, config=bc)
            except Exception as exc:  # the timed step reports it
                print(f"warm {n}x{k} m{m} {r}: {exc!r}", flush=True)
        torch.cuda.synchronize()
        del b, dl
    print("warm done", flush=True)
    return 0


def export(out: str, dest: str) -> None:
    """Copy the results (and all logs as one archive) to ``dest`` (at most a few files)."""
    if not dest:
        return
    import tarfile
    os.makedirs(dest, exist_ok=True)
    for name in ("check.json", "tuned_configs.json", "e2e.json", "bench.json"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(out, name), os.path.join(dest, name))
    with tarfile.open(os.path.join(dest, "logs.tgz"), "w:gz") as tar:
        for name in sorted(os.listdir(out)):
            if name.endswith(".log"):
                tar.add(os.path.join(out, name), arcname=name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--skip", default="", help="comma list of steps to skip")
    ap.add_argument("--procs", type=int, default=12, help="parallel compile processes")
    ap.add_argument("--export", default="", help="copy results here after every step")
    ap.add_argument("--warm", default=None, help=argparse.SUPPRESS)  # kind:i/P (internal)
    args = ap.parse_args()
    if args.warm:
        kind, ip = args.warm.split(":")
        i, p = (int(v) for v in ip.split("/"))
        return warm(kind, i, p, os.path.join(os.path.abspath(args.out), "tuned_configs.json"),
                    os.path.join(os.path.abspath(args.out), "base_configs.json"))
    t_end = time.time() + args.budget_s
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    base = os.path.join(out, "base_configs.json")
    shutil.copy(os.path.join(ROOT, "libortho", "kernels", "tuned_configs.json"), base)
    new = os.path.join(out, "tuned_configs.json")
    py = sys.executable
    left = lambda reserve: t_end - time.time() - reserve  # noqa: E731
    P = args.procs
    me = os.path.abspath(__file__)
    if "check" not in skip:
        parallel("check", [[py, "tests/gpu/test_kernels_gpu.py", "--part", f"{i}/{P}",
                            "--json", f"{out}/check{i}.json"] for i in range(P)], out,
                 max(60.0, min(100, left(280))))  # the check always gets a minute
        cases, dev = [], None
        for i in range(P):
            try:
                with open(f"{out}/check{i}.json") as f:
                    d = json.load(f)
                cases += d["cases"]
                dev = d["device"]
                os.remove(f"{out}/check{i}.json")
            except Exception:
                cases.append(dict(name=f"part {i} (no result)", ok=False, err=float("nan")))
        with open(f"{out}/check.json", "w") as f:
            json.dump(dict(device=dev, cases=cases), f, indent=1)
        export(out, args.export)
        bad = [c["name"] for c in cases if c["name"].startswith("v2") and not c["ok"]]
        if bad:
            print(f"!! v2 cases failed {bad}: the v2 kernel is not tuned in", flush=True)
            skip.add("tune")
    if "tune" not in skip:
        parallel("warmtune", [[py, me, "--out", out, "--warm", f"tune:{i}/{P}"]
                              for i in range(P)], out, min(90, left(230)))
        step("tune", [py, "-m", "libortho.kernel_bench", "--tune", "--tune-v2", "--tune-only",
                      "--tune-batches", "1,4,16", "--batches", "1,4,16",
                      "--tune-extra-shapes", "6144x4096,28672x4096",
                      "--save-configs", new], out, min(130, left(170)))
    if not os.path.exists(new):
        shutil.copy(base, new)
    export(out, args.export)
    if "warm" not in skip:
        parallel("warmfinal", [[py, me, "--out", out, "--warm", f"final:{i}/{P}"]
                               for i in range(P)], out, min(90, left(150)))
    if "e2e" not in skip:
        step("e2e", [py, "benchmarks/bench_e2e.py", "--configs", new, "--baseline-configs", base,
                     "--json", f"{out}/e2e.json"], out, min(100, left(70)))
        export(out, args.export)
    if "bench" not in skip:
        step("bench", [py, "-m", "libortho.kernel_bench", "--configs", new, "--baseline-configs", base,
                       "--batches", "1,4,16", "--json", f"{out}/bench.json", "--shapes",
                       ",".join(f"{n}x{k}" for n, k in SHAPES[:6])], out, left(5))
    export(out, args.export)
    summary(out)
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
        v2 = [x for x in c["cases"] if x["name"].startswith("v2")]
        print(f"\ncheck: {len(c['cases']) - len(bad)}/{len(c['cases'])} ok on {c['device']}; "
              f"failed: {bad}; v2 errs: "
              + " ".join(f"{x['err']:.1e}" for x in v2))
    t = load("tuned_configs.json")
    if t:
        for e in t.get("entries", []):
            if "us_previous_entry" in e:
                cfg = e["config"]
                print(f"tune {e['n']}x{e['k']} m{e['m']}: {e['us_previous_entry']:.1f} -> "
                      f"{e['us_alpha1_1pct']:.1f} us {cfg['kernel']} BM{cfg['BM']} BN{cfg['BN']}"
                      f" w{cfg['num_warps']} st{cfg.get('STAGES', '-')} gpt{cfg.get('GPT', '-')}"
                      f" sp{cfg.get('SPLIT')}")
    e = load("e2e.json")
    if e:
        print(f"\ne2e ({e['device']}):")
        for r in e["rows"]:
            print(f"  b{r['batch']:<3d} {r['variant']:20s} {r['step_ms']:7.3f} ms "
                  f"{r['tokens_per_s']:8.1f} tok/s  {r.get('speedup_vs_fp16', 0):.2f}x")
    b = load("bench.json")
    if b:
        print(f"\nbench ({b['env']['device']}, copy {b['copy_gbps']:.0f} GB/s, "
              f"partial={b.get('partial', False)}):")
        rows = {}
        for r in b["results"]:
            rows.setdefault((r["n"], r["k"], r["m"]), {})[r["row"]] = r["us"]
        cols = ["fp16", "torch_int4", "a0_base", "a0", "a1_1_base", "a1_1", "a1_0.5", "a1_2",
                "a1_1_rows", "naive_1"]
        print("  N×K M | " + " | ".join(cols))
        for key in sorted(rows):
            print(f"  {key[0]}x{key[1]} {key[2]} | "
                  + " | ".join(f"{rows[key][c]:.1f}" if c in rows[key] else "-" for c in cols))
        for g in b.get("goals", []):
            print(f"  {'MET ' if g['met'] else 'MISS'} {g['goal']} {g['n']}x{g['k']} "
                  f"m{g['m']}: {g['value']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
