"""Run directories: one run per directory, never overwritten or mixed, resumed only with the same settings.

A run directory holds ``run.json`` (the run id, when it started, and every resume with the settings it
changed), ``config.yaml`` (the settings the run trains with *now*), ``plan.json``, ``metrics.jsonl``,
``checkpoints/`` (each stamped with the run id) and ``final/``.

* ``opdkit train`` into a directory that holds a run refuses, naming ``--resume`` and ``--overwrite``.
* ``--overwrite`` removes the old run's files (only the names a run writes) first, and says so.
* ``--resume`` refuses settings that differ from the recorded ones, except the fields in
  :data:`RESUME_SAFE` (they change neither the math nor the data order); the changes it allows are
  recorded in ``run.json`` and ``config.yaml`` is rewritten, so the record never lies.
* On resume ``metrics.jsonl`` is cut back to the checkpoint's step, so each step appears once.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RUN_FILE = "run.json"
#: Every name a run writes into its directory (``--overwrite`` removes exactly these).
RUN_ARTIFACTS = (RUN_FILE, "config.yaml", "plan.json", "metrics.jsonl", "checkpoints", "final", "adapter",
                 "tensorboard", "wandb")

#: Fields a ``--resume`` may change, and why that is safe. Anything else refuses.
RESUME_SAFE = {
    "train.train_steps": "extends (or shortens) the run; a linear / cosine lr schedule is re-spread over the "
                         "new total from the resumed update on",
    "train.save_every_steps": "when checkpoints are written",
    "train.keep_checkpoints": "how many checkpoints stay on disk",
    "train.progress": "the progress bar",
    "train.tensorboard": "an extra logger",
    "train.wandb_project": "an extra logger",
    "train.microbatch_size": "memory only: the update does not depend on it (float sums in another order)",
    "train.teacher_microbatch_size": "memory only",
    "train.logprob_chunk_size": "memory only",
    "train.threads": "CPU threads (float sums in another order)",
    "train.max_bad_updates": "when a run of non-finite updates stops training",
    "train.stop_on_divergence": "whether a detected divergence stops the run",
    "train.divergence_factor": "the divergence detector's threshold",
    "train.divergence_zero_grad_updates": "the divergence detector's threshold",
}


class RunDirError(ValueError):
    """The run directory cannot be used as asked; the message says what to do instead."""


@dataclass
class RunRecord:
    """What ``run.json`` holds."""

    run_id: str
    created: float
    resumes: list = field(default_factory=list)
    finished_step: int | None = None  # rollout steps done when final/ was written

    def save(self, out_dir: Path) -> None:
        tmp = Path(out_dir) / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "created": self.created, "resumes": self.resumes,
                                   "finished_step": self.finished_step}, indent=1))
        tmp.replace(Path(out_dir) / RUN_FILE)


def read_run(out_dir: Path) -> RunRecord | None:
    p = Path(out_dir) / RUN_FILE
    if not p.is_file():
        return None
    d = json.loads(p.read_text())
    return RunRecord(run_id=str(d["run_id"]), created=float(d.get("created", 0.0)),
                     resumes=list(d.get("resumes", [])), finished_step=d.get("finished_step"))


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds anything a run writes."""
    out_dir = Path(out_dir)
    return out_dir.is_dir() and any((out_dir / name).exists() for name in RUN_ARTIFACTS)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(recorded: dict, current: dict) -> dict[str, tuple]:
    """``{field: (recorded, current)}`` for every field whose value differs (missing counts as ``None``)."""
    a, b = _flatten(recorded), _flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _describe(out_dir: Path) -> str:
    rec = read_run(out_dir)
    what = f"run {rec.run_id}" if rec else "files of a run"
    done = "finished" if (out_dir / "final").is_dir() else "unfinished"
    return f"{what}, {done}"


def remove_run(out_dir: Path) -> list[str]:
    """Delete what a run wrote into ``out_dir`` (only :data:`RUN_ARTIFACTS`); return the removed names."""
    removed = []
    for name in RUN_ARTIFACTS:
        p = Path(out_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def open_run(out_dir: Path, config: dict, *, resume: bool, overwrite: bool, log=print) -> RunRecord:
    """Decide what ``out_dir`` becomes for this run (main process only); returns the run record.

    New run: a fresh run id. ``resume``: the recorded run, after checking ``config`` (a nested dict, as
    ``config.yaml`` holds it) against the recorded settings. Raises :class:`RunDirError` to refuse.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise RunDirError("--resume continues the run in train.output_dir and --overwrite deletes it: pass one")
    if holds_run(out_dir) and not resume:
        if not overwrite:
            raise RunDirError(f"{out_dir} holds another run ({_describe(out_dir)}): continue it with --resume, "
                              f"start over with --overwrite (deletes it), or set another train.output_dir")
        log(f"--overwrite: removed the previous run ({_describe(out_dir)}) from {out_dir}: "
            f"{', '.join(remove_run(out_dir))}")
    if not resume or not holds_run(out_dir):
        if resume:
            log(f"--resume: {out_dir} holds no run yet; starting a new one")
        out_dir.mkdir(parents=True, exist_ok=True)
        rec = RunRecord(run_id=uuid.uuid4().hex[:12], created=time.time())
        rec.save(out_dir)
        return rec
    rec = read_run(out_dir)
    cfg_file = out_dir / "config.yaml"
    if rec is None or not cfg_file.is_file():
        raise RunDirError(f"{out_dir} has no run.json / config.yaml to resume from (written by another tool or "
                          f"an older opdkit): start over with --overwrite, or set another train.output_dir")
    changes = config_changes(yaml.safe_load(cfg_file.read_text()) or {}, config)
    unsafe = {k: v for k, v in changes.items() if k not in RESUME_SAFE}
    if unsafe:
        listed = "; ".join(f"{k}: recorded {a!r}, now {b!r}" for k, (a, b) in unsafe.items())
        raise RunDirError(f"--resume with settings that differ from the run's: {listed}. Resume with the "
                          f"recorded settings (config.yaml in {out_dir}) or start a new run in another "
                          f"train.output_dir (`opdkit train --help` lists the fields a resume may change)")
    if changes:
        rec.resumes.append({"time": time.time(), "changed": {k: list(v) for k, v in changes.items()}})
        log("--resume: changed " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    else:
        rec.resumes.append({"time": time.time(), "changed": {}})
    rec.save(out_dir)
    return rec


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of rollout steps ``< step`` (and lines without a step); drop the rest and any line
    a killed process left half-written. Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec.get("step"), int) and rec["step"] >= step:
            dropped += 1
            continue
        kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)
    return dropped
