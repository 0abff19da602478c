"""``opdkit train``: the OPD training loop (docs/methods.md §1-§5), top to bottom.

:func:`train` opens the run directory, builds the :class:`~opdkit.train.setup.Trainer` (models,
prompts, optimizer, every registry resolved), restores a checkpoint when resuming, then runs
:func:`~opdkit.train.step.rollout_step` (sample -> reward -> teacher -> passes of updates -> record)
once per rollout step, logging and checkpointing between steps.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import torch

from opdkit.config import Config, save_config, to_dict
from opdkit.runtime.models import load_tokenizer
from opdkit.train import checkpoint as ckpt
from opdkit.train.plan import check_world, format_plan, resolve_plan
from opdkit.train.rundir import RunDirError, RunRecord, open_run, read_run, truncate_metrics
from opdkit.train.setup import Trainer, build_update_spec, load_models, prompt_source, trainer_from_parts
from opdkit.train.step import StepPrompts, rollout_step
from opdkit.train.telemetry import MetricsLogger

__all__ = ["TrainingDiverged", "TrainingInterrupted", "build_update_spec", "train"]


class TrainingDiverged(RuntimeError):
    """Too many non-finite updates in a row, or a divergence the monitor detected (message says what)."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training: ``step`` is the rollout step that was running, ``checkpoint_step`` the step
    of the last complete checkpoint of this run (None: none yet), which ``--resume`` continues from."""

    def __init__(self, step: int, checkpoint_step: int | None):
        super().__init__(f"interrupted at rollout step {step}")
        self.step, self.checkpoint_step = step, checkpoint_step


class _CtrlC:
    """Ctrl-C during training, as a flag the loop reads after every optimizer update and rollout step.

    Why not Python's default handler: it raises KeyboardInterrupt wherever the main thread happens to be,
    and when that is inside a finaliser (``__del__``, a weakref callback) the exception is printed as
    "ignored" and lost. A run was seen in CI to go on training after Ctrl-C; that is the likely cause,
    and a flag cannot be lost that way. The first Ctrl-C only sets the flag (the loop stops at the next
    update); a second one raises at once, wherever it lands."""

    def __init__(self):
        self.requested, self._prev = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


def _open_run_dir(acc, out_dir: Path, cfg: Config, *, resume: bool, overwrite: bool, log) -> RunRecord:
    """Check / create the run directory on the main process (refusing before any model loads), then give
    every process the run id: checkpoints are stamped with it and only this run's are ever read."""
    if acc.is_main_process:
        open_run(out_dir, to_dict(cfg), resume=resume, overwrite=overwrite, log=log)
    acc.wait_for_everyone()
    return read_run(out_dir)


def _accelerator(cfg: Config):
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.train.device == "cpu")


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, print_fn=print) -> Path:
    """Run (or resume) OPD training as configured; returns the directory of the final model.

    ``train.output_dir`` must be empty or hold no run, unless ``resume`` (continue this run, with the
    recorded settings) or ``overwrite`` (delete the old run first): see :mod:`opdkit.train.rundir`."""
    acc = _accelerator(cfg)
    check_world(cfg, acc.num_processes)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    log = print_fn if acc.is_main_process else (lambda *a, **k: None)
    # The run directory is checked before any model loads, so a refused run costs nothing.
    run = _open_run_dir(acc, out_dir, cfg, resume=resume, overwrite=overwrite, log=log)
    if resume and run.finished_step == cfg.train.train_steps and (out_dir / "final").is_dir():
        log(f"--resume: the run in {out_dir} already finished its {run.finished_step} rollout steps; "
            f"nothing to do (raise train.train_steps to extend it)")
        return out_dir / "final"
    # Prompts first (they need only the tokenizer): a teacher.context the data cannot fill fails before any
    # model loads (preflight.check_context).
    source = prompt_source(cfg, load_tokenizer(cfg.model.tokenizer or cfg.model.student,
                                               trust_remote_code=cfg.model.trust_remote_code))
    student, teacher, tok, vocab = load_models(cfg, acc.device)
    t = trainer_from_parts(cfg, student, teacher, tok, vocab=vocab, acc=acc)
    start = _restore(t, source, out_dir, run, resume=resume, log=log)
    logger = _start_logging(t, source, out_dir, run, start, resume=resume, log=log)
    bar = _progress_bar(cfg, start) if acc.is_main_process else None
    step = start
    with _CtrlC() as ctrl_c:
        try:
            for step in range(start, cfg.train.train_steps):
                ctrl_c.check()
                # Every process takes the same prompts from the shared order and keeps its own slice.
                pos = source.next(cfg.rollout.prompts_per_step)[t.rank::t.world]
                prompts = StepPrompts([source.prompt_ids[i] for i in pos], [source.answers[i] for i in pos],
                                      [source.indices[i] for i in pos],
                                      [source.teacher_ids[i] for i in pos] if source.teacher_ids else None)
                rec = rollout_step(t, step, prompts,
                                   on_update=lambda m, s=step: _on_update(t, s, m, logger, bar, log, ctrl_c))
                _on_step(t, rec, logger, bar, log)
                if cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0 \
                        and step + 1 < cfg.train.train_steps:
                    _save(t, out_dir / "checkpoints", step + 1, source, run.run_id)
        except KeyboardInterrupt:  # the message, not a traceback, and how to continue
            last = ckpt.latest_checkpoint(out_dir / "checkpoints", run.run_id)
            raise TrainingInterrupted(step, int(last.name.split("_")[1]) if last else None) from None
    if bar is not None:
        bar.close()
    logger.close()
    final = _save_final(acc, t.student, tok, out_dir, lora=bool(cfg.model.lora_r))
    if acc.is_main_process:  # only now is the run finished: a resume of it has nothing left to do
        run.finished_step = cfg.train.train_steps
        run.save(out_dir)
    return final


def _restore(t: Trainer, source, out_dir: Path, run: RunRecord, *, resume: bool, log) -> int:
    """On ``--resume``, load this run's latest complete checkpoint (model, optimizer, schedule, data
    cursor, random streams, divergence monitor); return the rollout step to start from."""
    root = out_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(root, run.run_id) if resume else None
    if latest is None:
        if resume:
            log(f"--resume: no complete checkpoint of this run in {root}; starting from rollout step 0")
        return 0
    tstate, rstate = ckpt.load_checkpoint(latest, model=t.student, optimizer=t.optimizer, scheduler=t.scheduler,
                                          rank=t.rank)
    start, t.bad_streak = int(tstate["step"]), int(tstate["bad_streak"])
    source.load_state(tstate["data"])
    t.monitor.load_state(tstate.get("divergence", {}))
    ckpt.set_rng_state(rstate["rng"], t.generator)
    log(f"resumed from {latest} at rollout step {start}")
    if start > t.cfg.train.train_steps:
        raise RunDirError(f"--resume: the last checkpoint is at rollout step {start}, past "
                          f"train.train_steps = {t.cfg.train.train_steps}; raise train.train_steps")
    t.update_idx = start * t.cfg.train.rollout_passes * t.cfg.train.minibatches_per_pass
    return start


def _start_logging(t: Trainer, source, out_dir: Path, run: RunRecord, start: int, *, resume: bool,
                   log) -> MetricsLogger:
    """Write config.yaml and plan.json, print the plan, open metrics.jsonl (cut back to ``start`` on a
    resume, so that each rollout step appears once)."""
    cfg, main = t.cfg, t.acc.is_main_process
    plan = resolve_plan(cfg, t.world)
    if main:
        if resume:
            truncate_metrics(out_dir / "metrics.jsonl", start)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    log("opdkit train — resolved plan\n" + format_plan(plan) +
        f"\n  prompts available  {len(source):,} ({source.dropped} dropped as longer than "
        f"{cfg.data.max_prompt_tokens} tokens)\n  shared vocabulary  {t.vocab:,}\n  output  {out_dir}")
    logger = MetricsLogger(out_dir, enabled=main, tensorboard=cfg.train.tensorboard,
                           wandb_project=cfg.train.wandb_project, config=to_dict(cfg), resume=resume)
    if resume:
        logger.log("resume", {"from_step": start, "run_id": run.run_id,
                              "changed": run.resumes[-1]["changed"] if run.resumes else {}}, step=0)
    return logger


def _progress_bar(cfg: Config, start: int):
    if not cfg.train.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.train_steps, initial=start, desc="opd", unit="step", dynamic_ncols=True)


def _on_update(t: Trainer, step: int, m: dict, logger, bar, log, ctrl_c: _CtrlC | None = None) -> None:
    """After each optimizer update: log it, watch for divergence, stop after too many non-finite ones or
    after a Ctrl-C."""
    t.bad_streak = t.bad_streak + 1 if m["skipped"] else 0
    warn = t.monitor.update(m)
    logger.log("update", {"step": step, "update": t.update_idx, **m, **({"divergence": warn} if warn else {})},
               step=t.update_idx)
    if warn:
        _diverging(warn, step, t.cfg, bar, log)
    if t.bad_streak >= t.cfg.train.max_bad_updates:
        raise TrainingDiverged(f"{t.bad_streak} non-finite updates in a row at rollout step {step}: lower "
                               f"optim.lr, check the teacher's log-probs, or raise train.max_bad_updates")
    if ctrl_c is not None:
        ctrl_c.check()  # a Ctrl-C since the last update stops the run here (see _CtrlC)


def _on_step(t: Trainer, rec: dict, logger, bar, log) -> None:
    """After each rollout step: log its record, update the progress line, watch for divergence."""
    warn = t.monitor.step(rec)
    logger.log("step", {**rec, **({"divergence": warn} if warn else {})}, step=t.update_idx)
    if bar is not None:
        solve = rec["solve_rate"]
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3g}", kl=f"{rec['sampled_rkl']:.3g}",
                        gate=f"{rec['gate_min']:.2f}-{rec['gate_max']:.2f}",
                        solve="-" if solve is None else f"{solve:.2f}", **({"warn": "DIVERGING"} if warn else {}))
    if warn:
        _diverging(warn, rec["step"], t.cfg, bar, log)


def _diverging(warn: str, step: int, cfg: Config, bar, log) -> None:
    """Say it in the progress line and the log; stop the run when ``train.stop_on_divergence``."""
    msg = f"rollout step {step}: {warn}"
    (bar.write if bar is not None else log)(f"warning: {msg}")
    if cfg.train.stop_on_divergence:
        raise TrainingDiverged(f"diverged at {msg}; lower optim.lr (now {cfg.optim.lr:g}) or "
                               f"train.rollout_passes, or set train.stop_on_divergence=false to go on anyway")


def _save(t: Trainer, root: Path, step: int, source, run_id: str) -> None:
    """An atomic checkpoint of this run: every process writes its random-stream state, then the main
    process commits model, optimizer, schedule and trainer state and marks the checkpoint complete."""
    acc = t.acc
    if acc.is_main_process:
        ckpt.rank_tmp_dir(root, step).mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    ckpt.write_rank_state(root, step, acc.process_index, {"rng": ckpt.rng_state(t.generator)})
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "data": source.state(), "bad_streak": t.bad_streak, "divergence": t.monitor.state()}
        ckpt.commit_checkpoint(root, step, model=t.student, optimizer=t.optimizer, scheduler=t.scheduler,
                               trainer_state=state, run_id=run_id, keep=t.cfg.train.keep_checkpoints)
    acc.wait_for_everyone()


def _save_final(acc, model, tok, out_dir: Path, *, lora: bool) -> Path:
    final = out_dir / "final"
    acc.wait_for_everyone()
    if acc.is_main_process:
        if lora:
            model.save_pretrained(out_dir / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(final, safe_serialization=True)
        tok.save_pretrained(final)
    acc.wait_for_everyone()
    return final
