#!/bin/bash
# forget_eval.py over scenario seeds 0 1 2 on one GPU, three processes per seed (the variants
# split between them). PRESET=eval: the evaluation scenario (32 PINs per k, 200 non-members per
# format); PRESET=default: the default scenario. Needs the built-in GGUF at $GGUF; rows already in
# $RES/*.json are kept (a rerun resumes); all of them end up in $OUT/$PRESET.json.
# SEEDS="0 2" ONLY="NPO": those seeds only, one process each running only the named variants
# (comma-separated); SPLIT="a|b;c|d": one process per group and seed, each running the variants
# named in its group ("|"-separated), and SPLIT_<seed> the same for that seed alone; ARGS: more forget_eval.py options (--alphas 1 --no-quantized-reference);
# THREADS: CPU threads per process (the GPTQ fits run on the CPU). PRESEED: a forget_eval JSON (or this script's
# combined output) whose baseline rows start each new run file, so that they are not computed again: only where the
# scenarios are bitwise the same (the same card and software built them). PRESET=heldout: the held-out shape
# (standard-library docstrings, support-ticket records, 6-digit secrets at k 4 and 16); TEMPLATES=prose|code
# and CORPUS=stdlib: another record template family / public text for any preset (runs are then named
# e.g. eval-code, and their rows kept apart).
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=out PRESET=default bash experiments/gpu_eval.sh [SECONDS]
set -u
LIMIT=${1:-540}
PRESET=${PRESET:-eval}
SEEDS=${SEEDS:-0 1 2}
THREADS=${THREADS:-1}
export LIBORTHO_CACHE=${LIBORTHO_CACHE:-/root/lc} LIBORTHO_DEVICE=cuda PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
RES=${RES:-/root/res}; mkdir -p "$RES"
SCENARIO="--preset $PRESET ${TEMPLATES:+--templates $TEMPLATES} ${CORPUS:+--corpus $CORPUS}"
NAME=$PRESET${TEMPLATES:+-$TEMPLATES}${CORPUS:+-$CORPUS}
for s in $SEEDS; do  # the very configs the runs below use, so that they find them built
  python3 experiments/forget_eval.py $SCENARIO --model "$GGUF" --seeds "$s" --build-only 2>/dev/null &
done
wait
echo "scenarios built: $SECONDS s"
preseed() {  # out-file seed: start it from $PRESEED's baseline rows of that seed (FP, reference, quantized reference)
  [ -n "${PRESEED:-}" ] && [ ! -e "$1" ] && python3 - "$PRESEED" "$2" "$1" <<'PY'
import json, sys
src, seed, out = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
runs = src.values() if all(isinstance(v, dict) and set(v) <= {"0", "1", "2", "3", "4"} for v in src.values()) else [src]
for rows in runs:
    if seed in rows and "baselines" in rows[seed]:
        keep = {k: v for k, v in rows[seed].items() if k in ("baselines", "quantized reference")}
        json.dump({seed: keep}, open(out, "w"))
        break
PY
}
run() {  # seed part variants...
  local s=$1 part=$2; shift 2
  preseed "$RES/${NAME}_${part}_$s.json" "$s"
  timeout -s INT $((LIMIT - SECONDS)) python3 experiments/forget_eval.py $SCENARIO --model "$GGUF" \
    --seeds "$s" --threads "$THREADS" ${ARGS:-} --sample-extraction ${SAMPLES:-64} --out "$RES/${NAME}_${part}_$s.json" --only "$@" 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model" -e "clean_up_tokenization" | sed "s/^/[$part$s] /"
}
if [ -n "${SPLIT:-}" ]; then
  for s in $SEEDS; do
    per_seed="SPLIT_$s"; IFS=';' read -ra GS <<< "${!per_seed:-$SPLIT}"
    i=0
    for g in "${GS[@]}"; do IFS='|' read -ra NAMES <<< "$g"; run $s "G$i" "${NAMES[@]}" & i=$((i + 1)); done
  done
elif [ -n "${ONLY:-}" ]; then
  IFS=, read -ra NAMES <<< "$ONLY"
  for s in $SEEDS; do run $s X "${NAMES[@]}" & done
else for s in $SEEDS; do
  run $s A "plain GPTQ" records "records, 5 % ortho" "records, 10 % ortho" &
  run $s B lookalikes records-half "control (public text as X_priv)" "records, sieve lam_s 30" &
  run $s C NPO "free mu 1" &
done; fi
wait
echo "done: $SECONDS s"
# One file back: {run file name: its rows}, this run's files only.
python3 -c "import json,glob,os,sys; print(json.dumps({os.path.basename(f): json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/' + sys.argv[2] + '_*.json'))}))" "$RES" "$NAME" > "$OUT/$NAME.json"
