"""Checkpoints: a run killed with SIGKILL and resumed gives bit-for-bit the weights of an uninterrupted run;
an interrupted checkpoint write leaves the previous checkpoint in use."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from opdkit.train.checkpoint import latest_checkpoint


def _cmd(tiny_models, out, *extra):
    student, teacher, data = tiny_models
    return [sys.executable, "-m", "opdkit.cli.main", "train", f"model.student={student}", f"model.teacher={teacher}",
            f"data.train_file={data}", "data.prompt_template={problem}",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6", "train.train_steps=5", "train.save_every_steps=1", "train.threads=1",
            "train.progress=false", "train.device=cpu", "optim.lr=1e-3", "gate.name=block", "gate.block_size=2",
            "train.keep_checkpoints=2", f"train.output_dir={out}", *extra]


def _weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tiny_models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(tiny_models, ref), check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_models, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "step_000002" / "COMPLETE").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    ck = latest_checkpoint(run / "checkpoints")
    assert ck is not None and int(ck.name.split("_")[1]) >= 2

    res = subprocess.run(_cmd(tiny_models, run) + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_interrupted_checkpoint_write_falls_back_to_previous(tiny_models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(tiny_models, ref, "train.train_steps=3"), check=True, env=env, capture_output=True,
                   timeout=600)
    run = tmp_path / "run"
    subprocess.run(_cmd(tiny_models, run, "train.train_steps=3"), check=True, env=env, capture_output=True,
                   timeout=600)
    ckpts = run / "checkpoints"
    # what a SIGKILL in the middle of writing step 3 leaves: a temp dir, or a renamed dir without COMPLETE
    (ckpts / ".tmp-step_000003").mkdir()
    (ckpts / ".tmp-step_000003" / "model.safetensors").write_bytes(b"truncated")
    (ckpts / "step_000003").mkdir()
    assert latest_checkpoint(ckpts).name == "step_000002"
    import shutil

    shutil.rmtree(run / "final")
    res = subprocess.run(_cmd(tiny_models, run, "train.train_steps=3") + ["--resume"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "step_000002" in res.stdout
    a, b = _weights(ref), _weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
