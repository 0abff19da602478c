#!/usr/bin/env bash
# Interleaved trials of opdkit bench step against TRL's trainers (README, "The CPU step").
# CHECKOUT: an opdkit checkout; PY: its python; TRL_PY: a python with TRL 1.16 (benchmarks/bench_trl_step.py);
# OUT: the log directory; TRIALS: how many (5). SIXTH=1 adds the sixth stop's commands: opdkit with eager
# attention and fused AdamW, and TRL's GKD (bf16) with eager attention (its fastest configuration before).
set -u
cd "${CHECKOUT:?set CHECKOUT to an opdkit checkout}"
mkdir -p "${OUT:-logs}"
export PYTHONPATH=$CHECKOUT/src
PY=${PY:-python}
TRL=${TRL_PY:-trl-env/bin/python}
O=${OUT:-logs}
MIXED="--steps 10 --autocast bf16 --teacher-dtype bfloat16"
for trial in $(seq 1 "${TRIALS:-5}"); do
  $PY -m opdkit.cli.main bench step $MIXED > $O/opd_mixed_$trial.log 2>&1
  $PY -m opdkit.cli.main bench step $MIXED --static-decode > $O/opd_mixed_static_$trial.log 2>&1
  if [ -n "${SIXTH:-}" ]; then
    $PY -m opdkit.cli.main bench step $MIXED --static-decode --attn-implementation eager --adamw fused \
      > $O/opd_mixed_static_eager_fused_$trial.log 2>&1
  fi
  $TRL benchmarks/bench_trl_step.py --trainer distillation --steps 10 > $O/trl_dist_$trial.log 2>&1
  $TRL benchmarks/bench_trl_step.py --trainer gkd --steps 10 > $O/trl_gkd_$trial.log 2>&1
  $TRL benchmarks/bench_trl_step.py --trainer distillation --steps 10 --bf16 > $O/trl_dist_bf16_$trial.log 2>&1
  $TRL benchmarks/bench_trl_step.py --trainer gkd --steps 10 --bf16 > $O/trl_gkd_bf16_$trial.log 2>&1
  if [ -n "${SIXTH:-}" ]; then
    $TRL benchmarks/bench_trl_step.py --trainer gkd --steps 10 --bf16 --attn eager > $O/trl_gkd_bf16_eager_$trial.log 2>&1
  fi
  echo "trial $trial done $(date +%T)"
done
