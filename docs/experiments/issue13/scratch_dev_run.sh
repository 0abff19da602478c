#!/usr/bin/env bash
# run.sh NAME OVERRIDES... : train OPD on the 3x128 student (countdown worktree), then eval on dev seed 7
set -e
. /work/main/.venv/bin/activate
name=$1; shift
cd /work/wt-cd
export PYTHONPATH=/work/wt-cd/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OV=$(python3 -c "
import yaml;d=yaml.safe_load(open('/work/main/runs/cd3/runs/opd-seed0/job.yaml'));o=[x for x in d['overrides'] if not x.startswith(('train.output_dir','data.prompt_template','data.train_file','model.'))]+['model.student='+__import__('os').environ.get('STUDENT','/work/main/runs/build/M3/student'),'model.teacher=/work/main/runs/build/M3/teacher'];print(' '.join(o))")
out=/work/wt-cd/runs/dev/$name
case "$name" in *base) isbase=1;; *) isbase=0;; esac
if [ $isbase = 0 ]; then
python -m opdkit.cli.main train $OV 'data.prompt_template={problem}
' data.train_file=/work/wt-cd/runs/cd6/data/train.jsonl train.output_dir=$out "$@" --overwrite > $out.log 2>&1
model=$out/final
else model=${STUDENT:-/work/main/runs/build/M3/student}; mkdir -p $out; fi
python -m opdkit.cli.main eval --model $model --benchmarks chain8@7,chain12@7,chain16@7,chain24@7 --grader chain --template '{problem}
' --no-chat-template --n 8 --k 1,8 --max-new-tokens 300 --limit 32 --prompts-per-batch 16 --seed 0 --label $name --device cpu --out $out/eval >> $out.log 2>&1
python3 -c "
import json,sys
r=json.load(open('$out/eval/results.json'))
print('$name', json.dumps(r)[:600])
"
