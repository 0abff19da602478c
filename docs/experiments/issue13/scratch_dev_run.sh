#!/usr/bin/env bash
# scratch_dev_run.sh NAME [OVERRIDES...]: train OPD with the demo's default-preset settings on a student, then
# evaluate on the dev data seed 7 (chainK@7, never the held-out benchmarks). NAME ending in "base": evaluate
# STUDENT only. Run from a checkout with countdown_scratch.patch applied (its src/ is put first on PYTHONPATH).
#   MODELS=DIR (DIR/teacher, DIR/student)  STUDENT=DIR (default: $MODELS/student)  OUT=DIR (default: runs/dev)
#   TEACHER=DIR (default: $MODELS/teacher)  LIMIT=N problems per benchmark (32)  EVAL_SEED=S (0)
#   TRAIN=FILE (training prompts; default: written once to $OUT/train.jsonl as `opdkit demo` writes them)
#   SUMMARY=SCRIPT (default: scratch_dev_summary.py; strict_summary.py adds the strict pass@k)
set -euo pipefail
name=$1; shift
: "${MODELS:?set MODELS to a directory with teacher/ and student/}"
STUDENT=${STUDENT:-$MODELS/student}
TEACHER=${TEACHER:-$MODELS/teacher}
OUT=${OUT:-runs/dev}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TRAIN=${TRAIN:-$OUT/train.jsonl}
[ -f "$TRAIN" ] || python -c "
from opdkit.tasks.chain import make_train_prompts, write_jsonl
write_jsonl(make_train_prompts(4000, seed=0), '$TRAIN')"
out=$OUT/$name
case "$name" in
  *base) model=$STUDENT; mkdir -p "$out" ;;
  *)
    # the demo's default preset and its OPD variant, as a list of overrides (the prompt template holds a newline)
    mapfile -d '' OV < <(python -c "
import sys
from opdkit.demo.presets import PRESETS, VARIANTS
for o in PRESETS['default'].train + VARIANTS['opd'][1]:
    sys.stdout.write(o + '\0')")
    python -m opdkit.cli.main train "${OV[@]}" "model.student=$STUDENT" "model.teacher=$TEACHER" \
      "data.train_file=$TRAIN" "train.output_dir=$out" train.progress=false "$@" --overwrite > "$out.log" 2>&1
    model=$out/final ;;
esac
python -m opdkit.cli.main eval --model "$model" --benchmarks chain8@7,chain12@7,chain16@7,chain24@7 --grader chain \
  --template $'{problem}\n' --no-chat-template --n 8 --k 1,8 --max-new-tokens 300 --limit "${LIMIT:-32}" \
  --prompts-per-batch 16 --seed "${EVAL_SEED:-0}" --label "$name" --device cpu --out "$out/eval" >> "$out.log" 2>&1
python "${SUMMARY:-docs/experiments/issue13/scratch_dev_summary.py}" "$OUT"
