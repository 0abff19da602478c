"""Two CPU processes (gloo) give the same update as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_update_worker.py")


def _run(nproc, tiny_models, out, loss, gate, reduction):
    student, teacher, _ = tiny_models
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(WORKER), str(student), str(teacher), str(out), loss, gate, reduction]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out)), res.stdout


@pytest.mark.parametrize("loss, gate, reduction", [("opd", "block", "token-mean"),
                                                   ("lsm", "sequence", "seq-mean-token-mean")])
def test_two_processes_equal_one(tiny_models, tmp_path, loss, gate, reduction):
    one, out1 = _run(1, tiny_models, tmp_path / "one.safetensors", loss, gate, reduction)
    two, out2 = _run(2, tiny_models, tmp_path / "two.safetensors", loss, gate, reduction)
    assert "gate_min" in out1 and out1.split()[1][:8] == out2.split()[1][:8]  # same loss value
    assert abs(float(out1.split()[1])) > 1e-6  # a real, non-zero loss was optimized
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=2e-6, rtol=1e-5)


@pytest.mark.slow
def test_opdkit_train_under_torchrun_two_processes(tiny_models, tmp_path):
    student, teacher, data = tiny_models
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "opdkit.cli.main", "train", f"model.student={student}", f"model.teacher={teacher}",
           f"data.train_file={data}", "data.prompt_template={problem}", "rollout.prompts_per_step=4",
           "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "train.train_steps=2",
           "train.save_every_steps=1", "train.progress=false", "train.device=cpu", "gate.name=block",
           f"train.output_dir={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("resolved plan") == 1  # printed by rank 0 only
    assert '"processes": 2' in (tmp_path / "plan.json").read_text()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "step"' in line for line in lines) == 2
    assert (tmp_path / "checkpoints" / "step_000001" / "rank1.pt").is_file()
    assert (tmp_path / "final" / "model.safetensors").is_file()
