#!/usr/bin/env bash
# Interleaved trials of opdkit bench step against TRL's trainers (README, "The CPU step, fifth stop"; CHECKOUT, PY, TRL_PY, OUT as below).
# CHECKOUT: an opdkit checkout; PY: its python; TRL_PY: a python with TRL 1.16 (benchmarks/bench_trl_step.py)
set -u
cd "${CHECKOUT:?set CHECKOUT to an opdkit checkout}"
mkdir -p "${OUT:-logs}"
export PYTHONPATH=$CHECKOUT/src
PY=${PY:-python}
for trial in 1 2 3 4 5; do
  $PY -m opdkit.cli.main bench step --steps 10 --autocast bf16 --teacher-dtype bfloat16 > ${OUT:-logs}/opd_mixed_$trial.log 2>&1
  $PY -m opdkit.cli.main bench step --steps 10 --autocast bf16 --teacher-dtype bfloat16 --static-decode > ${OUT:-logs}/opd_mixed_static_$trial.log 2>&1
  ${TRL_PY:-trl-env/bin/python} benchmarks/bench_trl_step.py --trainer distillation --steps 10 > ${OUT:-logs}/trl_dist_$trial.log 2>&1
  ${TRL_PY:-trl-env/bin/python} benchmarks/bench_trl_step.py --trainer gkd --steps 10 > ${OUT:-logs}/trl_gkd_$trial.log 2>&1
  ${TRL_PY:-trl-env/bin/python} benchmarks/bench_trl_step.py --trainer distillation --steps 10 --bf16 > ${OUT:-logs}/trl_dist_bf16_$trial.log 2>&1
  ${TRL_PY:-trl-env/bin/python} benchmarks/bench_trl_step.py --trainer gkd --steps 10 --bf16 > ${OUT:-logs}/trl_gkd_bf16_$trial.log 2>&1
  echo "trial $trial done $(date +%T)"
done
