"""Wall time and peak RSS of `libortho decompose default` (GPTQ + sieve) on this machine.

Runs the CLI in a child process (so peak RSS is the decomposition's own), median of --repeats runs,
and writes docs/decompose_benchmark.json.

    python benchmarks/bench_decompose.py [--repeats 1] [--calib-tokens 16384]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from libortho.scenario import public_corpus

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="libortho-bench-"))
    calib = work / "calib.txt"
    calib.write_text(public_corpus("calibration"))
    cmd = [sys.executable, "-m", "libortho.cli", "decompose", "default", "", "--calib", str(calib),
           "--calib-tokens", str(args.calib_tokens)]
    runs = []
    try:
        for i in range(args.repeats):
            out = work / f"artifact{i}"
            cmd[5] = str(out)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            manifest = json.loads((out / "libortho.json").read_text())
            runs.append(dict(wall_seconds=wall, decompose_seconds=manifest["stats"]["seconds"]))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    result = dict(
        command="libortho decompose default OUT --calib <public_corpus('calibration')> "
                f"--calib-tokens {args.calib_tokens} (GPTQ INT4 g128, diag sieve, 1 % global budget, refit)",
        machine=f"{platform.machine()}, {os.cpu_count()} cores", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        runs=runs, median_wall_seconds=statistics.median(r["wall_seconds"] for r in runs),
        median_decompose_seconds=statistics.median(r["decompose_seconds"] for r in runs),
        peak_rss_gib=peak,
        note="wall includes interpreter start, loading the cached safetensors copy of the GGUF model and writing the artifact",
    )
    (DOCS / "decompose_benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
