"""``opdkit train --config FILE [section.field=value ...] [--resume | --overwrite] [--dry-run]``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import textwrap
from pathlib import Path

from opdkit.config import field_help, load_config


def _fields_epilog() -> str:
    from opdkit.train.rundir import RESUME_SAFE

    lines = ["configuration fields (YAML sections, or section.field=value on the command line):"]
    for name, default, help_text in field_help():
        lines.append(f"  {name} (default {default})")
        lines += textwrap.wrap(help_text, width=88, initial_indent="      ", subsequent_indent="      ")
    lines += ["", "fields --resume may change (any other difference from the recorded config refuses):"]
    lines += [f"  {k}: {why}" for k, why in RESUME_SAFE.items()]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run on-policy distillation", epilog=_fields_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a student on its own rollouts scored by a teacher (OPD, LSM, KL, "
                                   "with optional drift gating). Works under `accelerate launch` too. "
                                   "train.output_dir holds one run: a directory that holds another run is "
                                   "refused unless --resume or --overwrite.")
    p.add_argument("--config", help="YAML config file (sections: model, data, rollout, loss, gate, optim, train)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides, e.g. loss.name=lsm")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output_dir from its last complete checkpoint (same settings)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in train.output_dir (its checkpoints, metrics, final model) first")
    p.add_argument("--dry-run", action="store_true", help="validate the config and model paths, print the plan, "
                                                          "and exit (loads no model)")


def _check_models(cfg) -> list[str]:
    """Refuse a missing or unreadable model path before anything loads; notes for hub ids to download."""
    from opdkit.config import SELF_TEACHERS, ConfigError
    from opdkit.runtime.models import require_model_sources

    teacher = "" if cfg.model.teacher in SELF_TEACHERS else cfg.model.teacher  # self: the student's own path
    fields = [("model.student", cfg.model.student), ("model.teacher", teacher),
              ("model.tokenizer", cfg.model.tokenizer)]
    require_model_sources(fields, ConfigError)
    return [f"{name} = {value!r} is a hub id: it is downloaded unless cached" for name, value in fields
            if value and not Path(value).expanduser().exists()]


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments, with --resume (and no --overwrite)."""
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    return "opdkit " + " ".join(shlex.quote(a) for a in args) + " --resume"


def run(args) -> int:
    cfg = load_config(args.config, args.overrides, need_models=not args.dry_run)
    notes = _check_models(cfg)
    if args.dry_run:
        from opdkit.config import to_dict
        from opdkit.train.plan import format_plan, resolve_plan

        print("opdkit train — resolved plan (dry run)\n" + format_plan(resolve_plan(cfg)))
        for n in notes:
            print(f"  note: {n}")
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    from opdkit.train.loop import TrainingDiverged, TrainingInterrupted, train

    try:
        final = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        where = (f"the last checkpoint is at rollout step {e.checkpoint_step}" if e.checkpoint_step is not None
                 else "no checkpoint yet, so --resume starts from rollout step 0")
        print(f"opdkit train: interrupted at rollout step {e.step} ({where}); continue with: "
              f"{resume_command(args.argv)}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"opdkit train: {e}", file=sys.stderr)
        return 3
    print(f"final model: {final}")
    return 0
