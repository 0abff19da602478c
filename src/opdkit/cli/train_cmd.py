"""``opdkit train --config FILE [section.field=value ...] [--resume] [--dry-run]``."""

from __future__ import annotations

import argparse
import json
import textwrap

from opdkit.config import field_help, load_config


def _fields_epilog() -> str:
    lines = ["configuration fields (YAML sections, or section.field=value on the command line):"]
    for name, default, help_text in field_help():
        lines.append(f"  {name} (default {default})")
        lines += textwrap.wrap(help_text, width=88, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run on-policy distillation", epilog=_fields_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a student on its own rollouts scored by a teacher (OPD, LSM, KL, "
                                   "with optional drift gating). Works under `accelerate launch` too.")
    p.add_argument("--config", help="YAML config file (sections: model, data, rollout, loss, gate, optim, train)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="overrides, e.g. loss.name=lsm")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the plan, and exit")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides, need_models=not args.dry_run)
    if args.dry_run:
        from opdkit.config import to_dict
        from opdkit.train.plan import format_plan, resolve_plan

        print("opdkit train — resolved plan (dry run)\n" + format_plan(resolve_plan(cfg)))
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    from opdkit.train.loop import train

    final = train(cfg, resume=args.resume)
    print(f"final model: {final}")
    return 0
