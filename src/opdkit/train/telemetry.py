"""Run telemetry: ``metrics.jsonl`` always; TensorBoard and W&B when asked for."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def strict_json_value(v):
    """Non-finite floats become ``None`` (JSON ``null``), recursively, so every line is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: strict_json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json_value(x) for x in v]
    return v


class MetricsLogger:
    """Append one JSON line per record to ``out_dir/metrics.jsonl`` (rank 0 only).

    Lines are strict JSON: a non-finite value is written as ``null`` (Python's ``json`` would write a bare
    ``NaN``, which other JSON readers reject)."""

    def __init__(self, out_dir: Path, *, enabled: bool = True, tensorboard: bool = False,
                 wandb_project: str = "", config: dict | None = None, resume: bool = False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard = true needs `pip install tensorboard`") from e
            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.wandb_project needs `pip install wandb`") from e
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir))

    def log(self, kind: str, record: dict, *, step: int) -> None:
        if not self.enabled:
            return
        rec = strict_json_value({"kind": kind, "time": round(time.time(), 3), **record})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in rec.items() if isinstance(v, (int, float)) and k != "time"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path, kind: str | None = None, *, skip_bad: bool = False) -> list[dict]:
    """Records of a ``metrics.jsonl`` (optionally only one kind: 'update' or 'step'), the one reader of it.

    ``skip_bad`` skips lines that do not parse as a JSON object (a run that is still being written, or
    was killed mid-line); without it such a line raises ``json.JSONDecodeError``."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if skip_bad:
                    continue
                raise
            if isinstance(rec, dict) and (kind is None or rec.get("kind") == kind):
                out.append(rec)
    return out
