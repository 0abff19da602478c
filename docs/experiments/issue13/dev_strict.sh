#!/usr/bin/env bash
# dev_strict.sh NAME STUDENT SEED [OVERRIDES...]: scratch_dev_run.sh's dev protocol (the demo's default-preset
# OPD, then chainK@7, never the held-out benchmarks) with training seed SEED, evaluation seed SEED, LIMIT (128)
# problems per benchmark, and the strict pass@k in the summary. NAME ending in "base": evaluate STUDENT only.
#   TEACHER=DIR (default: the shipped teacher)  OUT=DIR (default: runs/dev_strict)  TRAIN=FILE
set -euo pipefail
name=$1; student=$2; seed=$3; shift 3
MODELS=${MODELS:-src/opdkit/assets/miniature} STUDENT=$student EVAL_SEED=$seed LIMIT=${LIMIT:-128} \
  OUT=${OUT:-runs/dev_strict} SUMMARY=docs/experiments/issue13/strict_summary.py \
  exec bash docs/experiments/issue13/scratch_dev_run.sh "$name" "train.seed=$seed" "$@"
