"""Write DAPO-Math-17k and the benchmarks as verl parquet files with opdkit's prompt template.

    opdkit verl-prepare --out ~/data/opdkit_verl                    # all five, from the data dir
    opdkit verl-prepare --out DIR --datasets dapo17k math500 --data-dir /path/to/jsonl

One row per problem in verl's RL-dataset layout (``verl.utils.dataset.rl_dataset.RLHFDataset``):
``data_source`` ("opdkit/<name>"), ``prompt`` (one user chat message: ``--template`` with ``{problem}``
replaced, by default opdkit's Qwen-math template, the one ``opdkit train`` / ``opdkit eval`` use; verl applies
the tokenizer's chat template to it, as opdkit does with ``chat_template: true``), ``ability`` ("math"),
``reward_model`` (``{"style": "rule", "ground_truth": answer}``, graded by
:func:`opdkit.integrations.verl.reward.compute_score`) and ``extra_info`` (``id``, ``index``, ``split``).
A name is one of opdkit's registered data files (dapo17k, math500, aime24, aime25, amc23), resolved in
``--data-dir`` or ``$OPDKIT_DATA_DIR``, or a path to any JSON Lines file with
``problem`` / ``answer`` fields.
"""

from __future__ import annotations

from pathlib import Path

from opdkit.runtime.benchmarks import load_benchmark
from opdkit.runtime.prompts import QWEN_MATH_TEMPLATE, prompt_text

DEFAULT_DATASETS = ("dapo17k", "math500", "aime24", "aime25", "amc23")
TRAIN_SETS = ("dapo17k",)


def verl_rows(problems, name: str, template: str) -> list[dict]:
    """verl RL-dataset rows for opdkit :class:`~opdkit.runtime.problems.Problem` s (template applied)."""
    split = "train" if name in TRAIN_SETS else "test"
    return [{
        "data_source": f"opdkit/{name}",
        "prompt": [{"role": "user", "content": prompt_text(p.problem, template)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": p.answer},
        "extra_info": {"id": p.id, "index": i, "split": split},
    } for i, p in enumerate(problems)]


def write_parquet(rows: list[dict], path: Path) -> None:
    import pandas as pd  # a verl dependency (with pyarrow); not one of opdkit's own

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def prepare(out: str | Path, datasets=DEFAULT_DATASETS, *, data_dir: str = "", template: str | None = None,
            limit: int = 0) -> dict[str, Path]:
    """Write ``<out>/<name>.parquet`` for each dataset; returns name -> path. ``limit`` > 0 keeps the first rows."""
    template = QWEN_MATH_TEMPLATE if template is None else template
    written = {}
    for name in datasets:
        problems = load_benchmark(name, data_dir=data_dir or None)
        if limit > 0:
            problems = problems[:limit]
        stem = Path(name).stem if name.endswith(".jsonl") else name
        path = Path(out) / f"{stem}.parquet"
        write_parquet(verl_rows(problems, stem, template), path)
        written[stem] = path
    return written
