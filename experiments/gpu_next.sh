#!/bin/bash
# The GPU checks and measurements that are built but not yet confirmed on a card, in 10-minute commands that must
# follow each other while the lent host is warm (it is released 30 s after a command ends).
#   bash experiments/gpu_next.sh kernels   # v3 kernel: GPU correctness first, then tune and bench (~7 min)
#   bash experiments/gpu_next.sh serve     # the slot-cache engine: check, graph loop, load (needs the GGUF, ~4 min)
#   bash experiments/gpu_next.sh scale     # the 8B checkpoints, then a decomposition stopped after LIMIT s (~9 min)
#   bash experiments/gpu_next.sh resume    # that decomposition resumed, then the artifact loaded and used (~5 min)
# Results go to $OUT (the device tool's folder). The serve step needs the built-in GGUF on PYTHONPATH (/tmp/site).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LIBORTHO_CACHE=/root/lc
mkdir -p "$OUT"
SMOL=/root/smol
case "$1" in
  kernels)
    python3 benchmarks/bench_decode_v3.py --out "$OUT" --budget-s "${BUDGET:-420}" 2>&1 | tail -40
    ;;
  serve)
    [ -d "$SMOL" ] || python3 -m libortho.cli decompose default "$SMOL" --calib README.md --method rtn --calib-tokens 2048 \
      --device cuda 2>&1 | tail -1
    timeout 150 python3 tests/gpu/serve_engine_check.py --device cuda --artifact "$SMOL" --json "$OUT/check_smol.json" 2>&1 | tail -20
    timeout 90 python3 benchmarks/bench_e2e.py --artifact "$SMOL" --batches 1,64 --steps 200 --json "$OUT/e2e.json" 2>&1 | tail -8
    timeout 150 python3 benchmarks/serve_load.py "$SMOL" --in-process --device cuda --requests 256 --concurrency 64 \
      --max-tokens 32 --serial 8 --json "$OUT/load.json" 2>&1 | tail -8
    ;;
  scale)  # LIMIT: seconds before the decomposition is stopped; about 55 s of each start is spent hashing the inputs
    OUT=$OUT SHAPE=8b bash experiments/gpu_scale.sh prepare 2>&1 | tail -4
    OUT=$OUT SHAPE=8b LIMIT=${LIMIT:-180} bash experiments/gpu_scale.sh run 2>&1 | grep -E 'returncode|wall_s|peak_|interrupted'
    ;;
  resume)
    OUT=$OUT SHAPE=8b LIMIT=540 bash experiments/gpu_scale.sh resume 2>&1 | grep -E 'resuming|returncode|wall_s|peak_|load_s|ms_per_token|perplexity'
    ;;
esac
