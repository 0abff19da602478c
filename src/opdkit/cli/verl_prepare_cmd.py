"""``opdkit verl-prepare --out DIR [--datasets ...]``: DAPO-Math-17k / benchmarks as verl parquet (README "At scale
on verl"); the work is :func:`opdkit.integrations.verl.prepare.prepare`."""

from __future__ import annotations

DEFAULT_DATASETS = ("dapo17k", "math500", "aime24", "aime25", "amc23")


def add_parser(sub) -> None:
    p = sub.add_parser("verl-prepare", help="write DAPO-Math-17k / the benchmarks as verl parquet files",
                       description="verl RL-dataset parquet files (one user message with opdkit's prompt template, "
                                   "the answer as reward_model.ground_truth for opdkit.integrations.verl.reward). "
                                   "Needs verl beside opdkit: pip install \"opdkit[verl]\".")
    p.add_argument("--out", required=True, help="output directory for <name>.parquet")
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                   help=f"registered names or .jsonl paths (default: {' '.join(DEFAULT_DATASETS)})")
    p.add_argument("--data-dir", default="", help="directory of the registered data files "
                   "(default: $OPDKIT_DATA_DIR)")
    p.add_argument("--template", default=None,
                   help="prompt template with {problem} (default: opdkit's Qwen-math template, as opdkit train)")
    p.add_argument("--limit", type=int, default=0, help="keep only the first N rows of each dataset (0: all)")


def run(args) -> int:
    try:
        from opdkit.integrations.verl.prepare import prepare
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "verl":
            raise
        raise ValueError('verl-prepare needs verl 0.9.1 beside opdkit: pip install "opdkit[verl]"') from e
    written = prepare(args.out, args.datasets, data_dir=args.data_dir, template=args.template, limit=args.limit)
    for name, path in written.items():
        print(f"{name}: {path}")
    from opdkit.config import SHIPPED_CONFIGS

    print(f"verl configs (--config-path): {SHIPPED_CONFIGS / 'verl'}")
    return 0
