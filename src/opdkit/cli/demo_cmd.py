"""``opdkit demo``: the CPU miniature of the six-variant benchmark (no download), and ``opdkit demo prepare``."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the CPU miniature benchmark (six OPD variants, pass@8 table)",
                       description="Distil the shipped tiny teacher into the shipped cold-start student with "
                                   "each variant under the same budget, evaluate pass@1 / pass@8 on four held-out "
                                   "synthetic benchmarks of increasing horizon, and write the report.")
    p.add_argument("action", nargs="?", default="run", choices=["run", "prepare"],
                   help="run (default) or prepare: rebuild the tiny teacher and student by SFT")
    from opdkit.demo.presets import PRESETS

    p.add_argument("--preset", default="default", help=", ".join(PRESETS) + " (reuse: the rollout-reuse "
                                                       "experiment with its controls, docs/extensions.md)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (a smoke run, ~3 minutes)")
    p.add_argument("--seeds", type=int, default=1, help="runs per variant (mean ± std, collapses counted)")
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel, one thread each")
    p.add_argument("--variants", default="", help="comma-separated subset (default: the preset's)")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--from-scratch", action="store_true",
                   help="rebuild the checkpoints first (one thread; README: build times)")
    p.add_argument("--models", default="", help="directory with teacher/ and student/ to use instead of the "
                                                "shipped checkpoints")
    p.add_argument("--eval-problems", type=int, default=0,
                   help="problems per held-out benchmark (default: the preset's; the README's 3-seed tables: 128)")
    p.add_argument("--train-prompts", type=int, default=4000, help="training prompts written for the run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer override for every variant, after the preset's (repeatable; a variant's own "
                        "loss / gate / advantage settings still apply), e.g. --set optim.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="keep the jobs of an earlier run in --out that finished "
                                                         "(their eval/results.json exists); run only the rest")
    p.add_argument("--overwrite", action="store_true", help="delete the jobs of an earlier run in --out and run "
                                                            "everything again")


def _prepare(out: Path, print_fn=print) -> tuple[Path, Path]:
    from opdkit.tasks.prepare import prepare_miniature

    report = prepare_miniature(out)
    print_fn(json.dumps(report, indent=1)[:2000])
    return out / "student", out / "teacher"


def _preset(args):
    """The preset with the command line's --eval-problems and --set applied (both checked here, before any job)."""
    from opdkit.demo.presets import get_preset

    preset = get_preset("quick" if args.quick else args.preset)
    if args.eval_problems:
        from opdkit.tasks.chain import BENCHMARK_SIZE

        if not 2 <= args.eval_problems <= BENCHMARK_SIZE:
            raise SystemExit(f"--eval-problems must be in 2..{BENCHMARK_SIZE} (the size of each benchmark), "
                             f"got {args.eval_problems}")
        preset = replace(preset, eval_problems=args.eval_problems)
    if args.set:
        bad = [x for x in args.set if "=" not in x]
        if bad:
            raise SystemExit(f"--set takes KEY=VALUE (e.g. optim.lr=1e-4), got {bad}")
        preset = replace(preset, train=[*preset.train, *args.set],
                         description=preset.description + "; overrides: " + " ".join(args.set))
        from opdkit.config import ConfigError, load_config

        try:  # fail here, not inside the first training job
            load_config(None, [*preset.train], need_models=False)
        except ConfigError as e:
            raise SystemExit(f"--set: {e}") from None
    return preset


def _check_out(args, out: Path) -> None:
    """Never mix two demo runs in one --out: an earlier run's jobs are kept (--resume) or deleted (--overwrite)."""
    runs_dir = out / "runs"
    if runs_dir.is_dir() and any(runs_dir.iterdir()):
        if args.resume and args.overwrite:
            raise SystemExit("--resume keeps the finished jobs in --out and --overwrite deletes them: pass one")
        if not (args.resume or args.overwrite):
            raise SystemExit(f"{out} holds the jobs of an earlier demo run: --resume keeps the finished ones, "
                             f"--overwrite deletes them and runs everything again, or choose another --out")
        if args.overwrite:
            import shutil

            shutil.rmtree(runs_dir)
            print(f"--overwrite: removed the earlier demo jobs in {runs_dir}")


def run(args) -> int:
    from opdkit.demo.presets import VARIANTS
    from opdkit.demo.report import write_demo_report
    from opdkit.demo.runner import run_all, shipped_models
    from opdkit.tasks.chain import make_train_prompts, write_jsonl

    out = Path(args.out)
    if args.action == "prepare":
        _prepare(out / "models")
        return 0
    preset = _preset(args)
    _check_out(args, out)
    t0 = time.perf_counter()
    if args.from_scratch:
        student, teacher = _prepare(out / "models")
    else:
        student, teacher = shipped_models(Path(args.models) if args.models else None)
    data = write_jsonl(make_train_prompts(args.train_prompts, seed=0), out / "data" / "train.jsonl")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or list(preset.variants)
    print(f"opdkit demo — preset {preset.name}: {preset.description}\n  variants: "
          + ", ".join(VARIANTS[v][0] for v in variants if v in VARIANTS)
          + f"\n  seeds: {args.seeds}, jobs in parallel: {args.jobs}, student: {student}, teacher: {teacher}"
          + f"\n  eval: {preset.eval_problems} problems x {preset.eval_n} samples on {', '.join(preset.benchmarks)}")
    runs = run_all(preset, out=out, seeds=args.seeds, jobs=args.jobs, variants=variants, student=student,
                   teacher=teacher, data=data, resume=args.resume)
    rep = write_demo_report(runs, variants, args.seeds, preset, out)
    wall = time.perf_counter() - t0
    print("\n" + rep.tables)
    print("collapsed runs (mean pass@8 below half the base student's "
          f"{100 * rep.collapse['base_mean']:.1f}%): " + ", ".join(
              f"{VARIANTS[n][0]} {v['collapsed']}/{v['runs']}" for n, v in rep.collapse["variants"].items()))
    print(f"\ntraining, mean of the first -> last 5 rollout steps:\n{rep.training_md}")
    print(f"\nhow the evaluated traces end (% of all samples):\n{rep.traces_md}")
    print(f"\nwall time {wall / 60:.1f} min; report: " + ", ".join(str(p) for p in rep.paths.values()))
    return 0
