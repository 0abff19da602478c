"""Run directories are never overwritten or mixed; resume is honest; divergence is loud; errors are one line.

Each test reproduces a probe of issue #11 that failed before (data loss, a record that lies, silent
wreckage, unclear errors) and checks the refusal or the correct result.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from opdkit.cli.main import main
from opdkit.train import checkpoint as ckpt
from opdkit.train.divergence import DivergenceMonitor
from opdkit.train.rundir import RUN_FILE, read_run, truncate_metrics
from opdkit.train.telemetry import MetricsLogger, read_metrics


def _argv(tiny_models, out, *extra):
    student, teacher, data = tiny_models
    return ["train", f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
            "data.prompt_template={problem}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=6", "train.train_steps=3", "train.save_every_steps=1", "train.threads=1",
            "train.progress=false", "train.device=cpu", "optim.lr=1e-3", f"train.output_dir={out}", *extra]


def _steps(out):
    return [r["step"] for r in read_metrics(out / "metrics.jsonl", "step")]


def test_train_into_a_finished_run_refuses_and_keeps_it(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_models, out)) == 0
    before = (out / "final" / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_argv(tiny_models, out, "optim.lr=5e-3")) == 2
    err = capsys.readouterr().err.strip()
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    assert ((out / "final" / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_text()) == before


def test_overwrite_removes_the_old_run_first_and_says_so(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_models, out, "train.train_steps=4")) == 0
    old_id = read_run(out).run_id
    (out / "notes.txt").write_text("mine")  # not a run file: never touched
    capsys.readouterr()
    assert main(_argv(tiny_models, out, "train.train_steps=2", "--overwrite")) == 0
    assert "--overwrite: removed the previous run" in capsys.readouterr().out
    rec = read_run(out)
    assert rec.run_id != old_id and rec.finished_step == 2
    assert _steps(out) == [0, 1]
    # only this run's checkpoints: the old run's step_000003 is gone, not kept as "newer"
    assert [s for s, _ in ckpt.complete_checkpoints(out / "checkpoints")] == [1]
    assert (out / "notes.txt").read_text() == "mine"


def test_checkpoint_discovery_and_pruning_see_only_this_run(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    root = tmp_path / "checkpoints"
    for step in (40, 50):  # another run's checkpoints, newer by step number
        ckpt.commit_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched,
                               trainer_state={"step": step}, keep=5, run_id="other")
    for step in (1, 2, 3):
        ckpt.commit_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched,
                               trainer_state={"step": step}, keep=2, run_id="mine")
    assert [s for s, _ in ckpt.complete_checkpoints(root, "mine")] == [2, 3]
    assert ckpt.latest_checkpoint(root, "mine").name == "step_000003"
    assert [s for s, _ in ckpt.complete_checkpoints(root, "other")] == [40, 50]  # never pruned by "mine"


def test_resume_refuses_changed_settings_and_names_them(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_models, out)) == 0
    cfg_before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(_argv(tiny_models, out, "optim.lr=1e-2", "loss.clip_eps=0.3", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr: recorded 0.001, now 0.01" in err and "loss.clip_eps" in err and len(err.splitlines()) == 1
    assert (out / "config.yaml").read_text() == cfg_before  # the record is not rewritten


def test_resume_extends_a_run_records_the_change_and_logs_each_step_once(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_models, out, "train.save_every_steps=2")) == 0  # checkpoint at step 2 only
    capsys.readouterr()
    assert main(_argv(tiny_models, out, "train.save_every_steps=2", "train.train_steps=5", "--resume")) == 0
    printed = capsys.readouterr().out
    assert "changed train.train_steps 3 -> 5" in printed and "step_000002" in printed
    assert _steps(out) == [0, 1, 2, 3, 4]  # step 2 ran twice, but is recorded once
    updates = read_metrics(out / "metrics.jsonl", "update")
    assert [u["update"] for u in updates] == list(range(1, 11))
    rec = read_run(out)
    assert rec.resumes[-1]["changed"] == {"train.train_steps": [3, 5]} and rec.finished_step == 5
    assert "train_steps: 5" in (out / "config.yaml").read_text()
    [resume] = read_metrics(out / "metrics.jsonl", "resume")
    assert resume["from_step"] == 2 and resume["changed"] == {"train.train_steps": [3, 5]}
    # the same command again: nothing to do, and nothing is retrained
    assert main(_argv(tiny_models, out, "train.save_every_steps=2", "train.train_steps=5", "--resume")) == 0
    assert "already finished" in capsys.readouterr().out and _steps(out) == [0, 1, 2, 3, 4]


def test_truncate_metrics_drops_later_steps_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "update", "step": 0}, {"kind": "step", "step": 0}, {"kind": "resume", "from_step": 1},
             {"kind": "update", "step": 1}, {"kind": "step", "step": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "upd')
    assert truncate_metrics(path, 1) == 3
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:3]


def test_metrics_are_strict_json_with_null_for_non_finite(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log("update", {"loss": float("nan"), "grad_norm": float("inf"), "ok": 1.5, "nested": [float("-inf")]},
            step=1)
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["ok"] == 1.5 and rec["nested"] == [None]


# --------------------------------------------------------------------------- divergence


def _upd(loss, grad_norm=1.0, skipped=0.0):
    return {"loss": loss, "grad_norm": grad_norm, "skipped": skipped, "tokens": 10.0}


def test_monitor_flags_an_exactly_zero_gradient_streak():
    mon = DivergenceMonitor(zero_grad_updates=3)
    assert mon.update(_upd(0.1, 0.5)) is None
    assert mon.update(_upd(0.1, 0.0)) is None and mon.update(_upd(0.1, 0.0)) is None
    assert "exactly 0 for 3 updates" in mon.update(_upd(0.1, 0.0))
    assert mon.update(_upd(0.1, 1e-12)) is None  # tiny but not zero: a real gradient


def test_monitor_flags_a_jump_over_the_running_mean_but_not_small_moves():
    mon = DivergenceMonitor(factor=10.0, min_jump=1.0, warmup=3)
    assert mon.update(_upd(50.0)) is None  # before warm-up nothing is flagged
    mon = DivergenceMonitor(factor=10.0, min_jump=1.0, warmup=3)
    for v in (0.08, 0.07, 0.09):
        assert mon.update(_upd(v)) is None
    assert mon.update(_upd(0.5)) is None  # 6x: below the factor
    assert "jumped to 9.5" in mon.update(_upd(9.5))
    small = DivergenceMonitor(factor=10.0, min_jump=1.0, warmup=3)
    for v in (1e-4, 1e-4, 1e-4):
        small.update(_upd(v))
    assert small.update(_upd(1e-2)) is None  # 100x but 0.01 nats: not a divergence
    kl = DivergenceMonitor(warmup=2)
    assert kl.step({"sampled_rkl": 0.3}) is None and kl.step({"sampled_rkl": 0.35}) is None
    assert "sampled reverse KL" in kl.step({"sampled_rkl": 7.8})


def test_monitor_state_round_trips():
    a = DivergenceMonitor()
    for v in (0.1, 0.2, 0.3):
        a.update(_upd(v, 0.0))
    b = DivergenceMonitor()
    b.load_state(a.state())
    assert b.update(_upd(0.1, 0.0)) == a.update(_upd(0.1, 0.0))


def test_a_wrecked_run_without_nan_stops_with_a_clear_message(tiny_models, tmp_path, capsys):
    """lr 1e3 saturates the tiny student: before, the run exited 0 with a wrecked model and no warning."""
    out = tmp_path / "run"
    assert main(_argv(tiny_models, out, "optim.lr=1e3", "train.train_steps=6", "rollout.max_new_tokens=8")) == 3
    err = capsys.readouterr().err
    [line] = [x for x in err.splitlines() if x.startswith("opdkit")]  # (transformers prints load bars too)
    assert line.startswith("opdkit train: diverged at rollout step") and "optim.lr" in line
    assert "stop_on_divergence=false" in line and "Traceback" not in err
    assert not (out / "final").exists()
    assert any("divergence" in r for r in read_metrics(out / "metrics.jsonl"))


def test_divergence_warns_and_goes_on_when_told(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_argv(tiny_models, out, "optim.lr=1e3", "train.train_steps=6", "rollout.max_new_tokens=8",
                    "train.stop_on_divergence=false"))
    assert rc == 0 and (out / "final").is_dir()
    assert "warning: rollout step" in capsys.readouterr().out
    flagged = [r for r in read_metrics(out / "metrics.jsonl") if "divergence" in r]
    assert flagged and all(isinstance(r["divergence"], str) for r in flagged)


def test_non_finite_run_writes_null_and_stops_without_traceback(tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny_models, out, "optim.lr=1e30", "train.train_steps=4", "rollout.max_new_tokens=8")) == 3
    err = capsys.readouterr().err
    assert "non-finite updates in a row" in err and "Traceback" not in err
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


# --------------------------------------------------------------------------- errors a person can act on


def test_dry_run_refuses_a_missing_model_path_before_loading(tiny_models, tmp_path, capsys):
    _, teacher, data = tiny_models
    rc = main(["train", f"model.student={tmp_path / 'nope'}", f"model.teacher={teacher}",
               f"data.train_file={data}", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.student" in err and "no such directory" in err and len(err.splitlines()) == 1
    no_config = tmp_path / "empty"
    no_config.mkdir()
    assert main(["train", f"model.student={tiny_models[0]}", f"model.teacher={no_config}",
                 f"data.train_file={data}", "--dry-run"]) == 2
    assert "model.teacher" in capsys.readouterr().err


def test_data_rows_without_id_get_line_ids(tiny_models, tmp_path):
    from opdkit.runtime.problems import load_jsonl_problems

    path = tmp_path / "noid.jsonl"
    path.write_text('{"problem": "1+1=?", "answer": 2}\n\n{"problem": "2+2=?", "answer": "4", "id": "x"}\n')
    probs = load_jsonl_problems(path)
    assert [(p.id, p.answer) for p in probs] == [("noid-1", "2"), ("x", "4")]
    student, teacher, _ = tiny_models
    assert main(_argv(tiny_models, tmp_path / "run", f"data.train_file={path}", "train.train_steps=1")) == 0


def test_ctrl_c_says_how_to_resume_and_exits_130(tiny_models, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "opdkit.cli.main", *_argv(tiny_models, out, "train.train_steps=100000")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # a hang guard, not a timing assertion
        while time.monotonic() < deadline and ckpt.latest_checkpoint(out / "checkpoints") is None:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=300)  # a hang guard, not a timing assertion
        except subprocess.TimeoutExpired:  # show where it waits (cli.main registers SIGUSR1 with faulthandler)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(5)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail("no exit 300 s after Ctrl-C; its stacks:\n" + err[-6000:])
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("opdkit train: interrupted at rollout step")]
    assert "last checkpoint is at rollout step" in line and line.rstrip().endswith("--resume")
    assert "continue with: opdkit train" in line and f"train.output_dir={out}" in line
    assert (out / RUN_FILE).is_file() and not (out / "final").exists()


def test_ctrl_c_is_a_flag_read_between_updates():
    # the first Ctrl-C only sets the flag (nothing raised inside the handler can be lost in a finaliser);
    # check() raises at the next update; a second Ctrl-C raises at once; the old handler comes back after
    from opdkit.train.loop import _CtrlC

    before = signal.getsignal(signal.SIGINT)
    with _CtrlC() as ctrl_c:
        ctrl_c.check()  # nothing requested yet
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert ctrl_c.requested
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # a hang guard, not a timing assertion: the second signal raises at once
    assert signal.getsignal(signal.SIGINT) is before
