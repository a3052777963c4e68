#!/bin/bash
# The scale runs on a lent GPU host, in 10-minute commands that must follow each other while the host is warm.
#   bash experiments/gpu_scale.sh prepare   # 8B checkpoints (background) + GPU-vs-CPU unit tests + per-stage fit costs
#   bash experiments/gpu_scale.sh run       # SmolLM2 CPU-vs-GPU decomposition (background) + the 8B decomposition
#   bash experiments/gpu_scale.sh resume    # the 8B decomposition continued with --resume, then the artifact used
# FITS=1 adds the per-stage fit costs to prepare; SMOL=1 adds the SmolLM2 CPU-vs-GPU comparison to run (needs the GGUF).
# Results go to $OUT (the device tool's folder). SHAPE=8b by default; LIMIT: seconds before the decomposition
# is interrupted (it then resumes in the next command).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LIBORTHO_CACHE=/root/lc
SHAPE=${SHAPE:-8b}
WORK=/root/scale
LIMIT=${LIMIT:-480}
mkdir -p "$WORK" "$OUT"
case "$1" in
  prepare)
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import decompose_scale as d; from pathlib import Path
d.write_checkpoints(Path('$WORK'), '$SHAPE', 'cuda'); d.write_inputs(Path('$WORK'))" > "$OUT/prepare.log" 2>&1 &
    gen=$!
    python3 -m pytest -o addopts="" -q tests/gpu/test_decompose_gpu.py > "$OUT/test_decompose_gpu.log" 2>&1
    tail -3 "$OUT/test_decompose_gpu.log"
    if [ "${FITS:-0}" = 1 ]; then
      python3 benchmarks/fit_stage_costs.py --device cuda --shapes 8b --json "$OUT/fit_costs_8b_cuda.json" 2>&1 | tail -4
      python3 benchmarks/fit_stage_costs.py --device cpu --shapes 8b --repeat 1 --json "$OUT/fit_costs_8b_cpu16.json" 2>&1 | tail -4
    fi
    wait $gen; echo "checkpoints: $SECONDS s"; tail -2 "$OUT/prepare.log"; du -sh "$WORK"/*
    ;;
  run)
    cmp=""
    if [ "${SMOL:-0}" = 1 ]; then
      timeout 560 python3 tests/gpu/test_decompose_gpu.py --json "$OUT/gpu_vs_cpu.json" > "$OUT/gpu_vs_cpu.log" 2>&1 &
      cmp=$!
    fi
    python3 benchmarks/decompose_scale.py --shape "$SHAPE" --work "$WORK" --device cuda --out "$SHAPE-run" \
      --time-limit "$LIMIT" --json "$OUT/scale.json" 2>&1 | grep -v "Loading weights" | tail -45
    if [ -n "$cmp" ]; then wait $cmp; tail -30 "$OUT/gpu_vs_cpu.log"; fi
    ;;
  resume)
    python3 benchmarks/decompose_scale.py --shape "$SHAPE" --work "$WORK" --device cuda --out "$SHAPE-run" \
      --time-limit "$LIMIT" --json "$OUT/scale.json" --extra --resume 2>&1 | grep -v "Loading weights" | tail -45
    ls -la "$WORK/$SHAPE-run" 2>/dev/null; du -sh "$WORK"/* 2>/dev/null
    if [ -f "$WORK/$SHAPE-run/libortho.json" ]; then
      python3 benchmarks/load_artifact.py "$WORK/$SHAPE-run" --device cuda --json "$OUT/load_$SHAPE.json" 2>&1 | grep -v "Loading weights" | tail -45
    fi
    ;;
esac
