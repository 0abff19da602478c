"""``opdkit`` command line: one sub-command per job; each lives in its own module."""

from __future__ import annotations

import argparse
import faulthandler
import io
import signal
import sys
import threading

from opdkit.cli import train_cmd

COMMANDS = {"train": train_cmd}


def _optional_commands() -> None:
    """Sub-commands whose modules exist in this version (eval, report, demo, bench, diagnose, verl-prepare)."""
    import importlib

    for name in ("eval", "report", "demo", "bench", "diagnose", "verl_prepare"):
        try:
            COMMANDS[name.replace("_", "-")] = importlib.import_module(f"opdkit.cli.{name}_cmd")
        except ModuleNotFoundError as e:
            if e.name != f"opdkit.cli.{name}_cmd":
                raise


def build_parser() -> argparse.ArgumentParser:
    _optional_commands()
    parser = argparse.ArgumentParser(prog="opdkit", description="On-policy distillation of language models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMANDS.values():
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; a user-facing error is one line on stderr (the traceback only with --debug)."""
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        # `kill -USR1 <pid>` prints every thread's stack to stderr and carries on: how to see where a run waits
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (AttributeError, ValueError, io.UnsupportedOperation):  # stderr without a file descriptor
            pass
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = [a for a in argv if a != "--debug"]
    if not args.command:
        parser.print_help()
        return 2
    from opdkit.config import ConfigError

    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"opdkit {args.command}: configuration error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, PermissionError) as e:  # our clear, user-facing errors
        if args.debug:
            raise
        print(f"opdkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"opdkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
