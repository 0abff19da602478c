#!/usr/bin/env bash
# dev_strict.sh NAME STUDENT SEED [OVERRIDES...]: the demo's default-preset OPD on STUDENT with training seed
# SEED, then an evaluation on the dev problems chainK@7 (never the held-out benchmarks), LIMIT (128) problems
# per benchmark x 8 samples, evaluation seed SEED. NAME ending in "base": evaluate STUDENT only. Prints the
# strict and answer-graded pass@1 / pass@8 of every run in OUT. Run from the checkout whose task you measure.
#   TEACHER=DIR (default: the shipped teacher)  OUT=DIR (default: runs/dev_strict)
#   TRAIN=FILE (default: written once to $OUT/train.jsonl as `opdkit demo` writes them)
set -euo pipefail
name=$1; student=$2; seed=$3; shift 3
OUT=${OUT:-runs/dev_strict}; LIMIT=${LIMIT:-128}
TEACHER=${TEACHER:-src/opdkit/assets/miniature/teacher}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
TRAIN=${TRAIN:-$OUT/train.jsonl}
[ -f "$TRAIN" ] || python -c "
from opdkit.tasks.chain import make_train_prompts, write_jsonl
write_jsonl(make_train_prompts(4000, seed=0), '$TRAIN')"
out=$OUT/$name
case "$name" in
  *base) model=$student; mkdir -p "$out" ;;
  *)
    mapfile -d '' OV < <(python -c "
import sys
from opdkit.demo.presets import PRESETS, VARIANTS
for o in PRESETS['default'].train + VARIANTS['opd'][1]:
    sys.stdout.write(o + '\0')")
    python -m opdkit.cli.main train "${OV[@]}" "model.student=$student" "model.teacher=$TEACHER" \
      "data.train_file=$TRAIN" "train.output_dir=$out" train.progress=false "train.seed=$seed" "$@" \
      --overwrite > "$out.log" 2>&1
    model=$out/final ;;
esac
python -m opdkit.cli.main eval --model "$model" --benchmarks chain8@7,chain12@7,chain16@7,chain24@7 --grader chain \
  --template $'{problem}\n' --no-chat-template --n 8 --k 1,8 --max-new-tokens 300 --limit "$LIMIT" \
  --prompts-per-batch 16 --seed "$seed" --label "$name" --device cpu --out "$out/eval" >> "$out.log" 2>&1
python docs/experiments/issue13/strict_summary.py "$OUT"/*/
