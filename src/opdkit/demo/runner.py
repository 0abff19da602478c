"""Run the CPU miniature: every (variant, seed) trains with ``opdkit train`` and is evaluated with
``opdkit eval`` in its own single-threaded process, ``jobs`` at a time; then one report.

Why processes with one thread each: on a busy 2-core machine two threads per process were seen to run
10-30x slower; two one-thread jobs use both cores fully.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import yaml

from opdkit.demo.presets import VARIANTS, Preset
from opdkit.eval.runs import seed_group_key

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "miniature"


def shipped_models(root: Path | None = None) -> tuple[Path, Path]:
    """(student, teacher) directories: the shipped ones, or ``root/{student,teacher}``."""
    root = root or ASSETS
    teacher, student = root / "teacher", root / "student"
    if not (teacher / "model.safetensors").is_file() or not (student / "model.safetensors").is_file():
        raise FileNotFoundError(f"no miniature checkpoints (teacher/, student/ with model.safetensors) under "
                                f"{root}; run `opdkit demo --from-scratch` to rebuild them")
    return student, teacher


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    if res.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"command failed ({res.returncode}); log {log}:\n{tail}")


def eval_cmd(model: Path, out: Path, preset: Preset, label: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "opdkit.cli.main", "eval", "--model", str(model), "--benchmarks",
            ",".join(preset.benchmarks), "--grader", "chain", "--template", "{problem}\n", "--no-chat-template",
            "--n", str(preset.eval_n), "--k", f"1,{preset.eval_n}", "--max-new-tokens", "300",
            "--limit", str(preset.eval_problems), "--prompts-per-batch", "16", "--seed", str(seed),
            "--label", label, "--device", "cpu", "--out", str(out)]


def train_job(name: str, seed: int, preset: Preset, student: Path, teacher: Path, data: Path, out: Path) -> Path:
    """Train one variant with one seed, then evaluate it; returns its run directory."""
    label, overrides = VARIANTS[name]
    run = out / "runs" / f"{name}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    over = [f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
            f"train.seed={seed}", f"train.output_dir={run}", "train.progress=false", *preset.train, *overrides]
    (run / "job.yaml").write_text(yaml.safe_dump({"variant": name, "seed": seed, "overrides": over,
                                                  "settings": job_settings(name, preset)}))
    log = run / "job.log"
    log.write_text("")
    # --overwrite: a job the demo (re)starts replaces the unfinished one it may have left (run_all keeps
    # finished jobs only with --resume, and the demo refuses an earlier run's --out without one of its flags)
    _run([sys.executable, "-m", "opdkit.cli.main", "train", *over, "--overwrite"], log)
    _run(eval_cmd(run / "final", run / "eval", preset, f"{label}-seed{seed}", seed), log)
    return run


def reference_key(kind: str, seed: int | None) -> str:
    """Job name of a reference evaluation: ``base-seedS`` (the base student is evaluated with every training
    seed's evaluation seed, so each variant seed has its paired base), ``teacher`` (once, seed 0)."""
    return f"base-seed{seed}" if kind == "base" else kind


def reference_job(kind: str, model: Path, preset: Preset, out: Path, seed: int = 0) -> Path:
    """Evaluate the shipped student ("base student", evaluation seed ``seed``) or the teacher with the same
    protocol as the trained variants (which are evaluated with their training seed)."""
    run = out / "runs" / reference_key(kind, seed)
    run.mkdir(parents=True, exist_ok=True)
    log = run / "job.log"
    log.write_text("")
    label = f"base student-seed{seed}" if kind == "base" else "teacher"
    _run(eval_cmd(model, run / "eval", preset, label, seed), log)
    return run


def job_settings(name: str, preset: Preset) -> dict:
    """What a training job's result depends on besides its seed and model paths (checked by ``--resume``)."""
    return {"train": [*preset.train, *VARIANTS[name][1]], "eval": [preset.eval_problems, preset.eval_n,
                                                                  list(preset.benchmarks)]}


def _finished(out: Path, key: str, name: str, preset: Preset) -> Path | None:
    """The run dir of a finished job (``eval/results.json`` exists), else None. A finished training job
    whose recorded settings differ from ``preset``'s is an error: resuming would mix two experiments."""
    run = out / "runs" / key
    if not (run / "eval" / "results.json").is_file():
        return None
    job = run / "job.yaml"
    if job.is_file():
        recorded = (yaml.safe_load(job.read_text()) or {}).get("settings")
        if recorded is not None and recorded != job_settings(name, preset):
            raise ValueError(f"--resume: {run} was run with other settings ({recorded}) than this preset "
                             f"({job_settings(name, preset)}); use another --out or delete that run")
    return run


def run_all(preset: Preset, *, out: Path, seeds: int = 1, jobs: int = 2, variants: list[str] | None = None,
            student: Path, teacher: Path, data: Path, resume: bool = False, print_fn=print) -> dict[str, Path]:
    """Run references and variants; returns {job name: run dir}. With ``resume``, jobs whose
    ``eval/results.json`` already exists under ``out/runs`` are kept, not re-run."""
    names = list(variants or preset.variants)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    refs = [("base", s) for s in range(seeds)] + [("teacher", None)]
    todo = refs + [(n, s) for s in range(seeds) for n in names]
    done: dict[str, Path] = {}

    def key_of(name: str, seed: int | None) -> str:
        return reference_key(name, seed) if (name, seed) in refs else f"{name}-seed{seed}"

    if resume:
        for name, seed in list(todo):
            key = key_of(name, seed)
            if (run := _finished(out, key, name, preset)) is not None:
                done[key] = run
                todo.remove((name, seed))
        if done:
            print_fn(f"--resume: keeping {len(done)} finished job(s) in {out / 'runs'}; {len(todo)} to run")
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"demo ({preset.name})", unit="job", dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {}
        for name, seed in todo:
            if (name, seed) in refs:
                fut = pool.submit(reference_job, name, student if name == "base" else teacher, preset, out, seed or 0)
            else:
                fut = pool.submit(train_job, name, seed, preset, student, teacher, data, out)
            futs[fut] = key_of(name, seed)
        for fut in as_completed(futs):
            key = futs[fut]
            done[key] = fut.result()
            bar.update(1)
            bar.set_postfix(last=key, elapsed=f"{time.perf_counter() - t0:.0f}s")
    bar.close()
    return done


def collapse_summary(runs: dict[str, Path], metric: str = "pass@8") -> dict:
    """Collapse = a trained run's mean ``metric`` below half of the base student's (its mean over its
    evaluation seeds; ours)."""
    def mean_of(run: Path) -> float:
        return json.loads((run / "eval" / "results.json").read_text())["mean"][metric]

    bases = [mean_of(run) for key, run in runs.items() if seed_group_key(key)[0] == "base"]
    base = sum(bases) / len(bases)
    out: dict = {"base_mean": base, "threshold": base / 2, "variants": {}}
    for key, run in runs.items():
        name = seed_group_key(key)[0]
        if name in ("base", "teacher"):
            continue
        v = out["variants"].setdefault(name, {"runs": 0, "collapsed": 0, "means": []})
        m = mean_of(run)
        v["runs"] += 1
        v["means"].append(m)
        v["collapsed"] += int(m < base / 2)
    return out
