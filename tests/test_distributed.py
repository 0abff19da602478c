"""Two CPU processes (gloo) give the same update as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_update_worker.py")


def _run(nproc, tiny_models, out, loss, gate, reduction, *extra):
    student, teacher, _ = tiny_models
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(WORKER), str(student), str(teacher), str(out), loss, gate, reduction, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out)), res.stdout


EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("loss, gate, reduction", [("opd", "block", "token-mean"),
                                                   ("lsm", "sequence", "seq-mean-token-mean")])
def test_two_processes_equal_one(tiny_models, tmp_path, loss, gate, reduction):
    """The gradient the optimizer step receives, and the loss, are the same for 1 and 2 processes.

    Tolerance: each gradient element is a float32 sum over the batch's response tokens (N of them),
    grouped differently with two processes (other micro-batches, other padding, then an all-reduce).
    Reordering a float32 sum of N terms changes it by at most about N * eps32 * (sum of |terms|); the
    terms are bounded by the largest gradient element, so we allow N * eps32 * max|g| (absolute, per
    update) and N * eps32 relative on the loss. A real bug (a wrong denominator, a missing all-reduce,
    a row counted twice) changes the gradient by a factor, far outside this.
    """
    _assert_same_update(tiny_models, tmp_path, loss, gate, reduction)


def _assert_same_update(tiny_models, tmp_path, loss, gate, reduction, *extra):
    one, _ = _run(1, tiny_models, tmp_path / "one.safetensors", loss, gate, reduction, *extra)
    two, _ = _run(2, tiny_models, tmp_path / "two.safetensors", loss, gate, reduction, *extra)
    n_tokens = float(one.pop("__tokens__"))
    two.pop("__tokens__")
    loss1, loss2 = float(one.pop("__loss__")), float(two.pop("__loss__"))
    assert abs(loss1) > 1e-6  # a real, non-zero loss was optimized
    assert abs(loss1 - loss2) <= n_tokens * EPS32 * abs(loss1), (loss1, loss2)
    assert one.keys() == two.keys() and len(one) > 0
    g_max = max(float(g.abs().max()) for g in one.values())
    assert g_max > 0
    atol = n_tokens * EPS32 * g_max
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=atol, rtol=0.0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_sg_opd_rank_without_endorsed_teacher_sample_joins_every_collective(tiny_models, tmp_path):
    """SG-OPD's NLL term when rank 1 has no endorsed teacher response: no hang (the worker exits after
    240 s otherwise), and the same update as one process holding the same endorsed responses (same
    tolerance as above; the token count includes the endorsed responses')."""
    _assert_same_update(tiny_models, tmp_path, "opd", "block", "token-mean", "sft")


@pytest.mark.slow
def test_bucketed_gradient_all_reduce_equals_per_parameter(tmp_path):
    """Two gloo processes: the flat-bucket all-reduce gives each gradient the per-parameter sum (float32
    / float64 rounding of a two-term sum), fills a gradient missing on one rank, leaves None-everywhere
    None (tests/dist_grad_sync_worker.py checks it on every rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(Path(__file__).with_name("dist_grad_sync_worker.py"))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count(": ok") == 2


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
