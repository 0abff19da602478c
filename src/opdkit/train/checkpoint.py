"""Atomic checkpoints: model (safetensors), optimizer, scheduler, RNG states and data position.

A checkpoint is written into ``checkpoints/.tmp-step_N`` and renamed to ``checkpoints/step_N`` only
after every file is flushed and a ``COMPLETE`` marker is written, so a process killed (even with
SIGKILL) while writing leaves the previous checkpoint intact; leftovers of a killed write are ignored
and removed at the next save. Everything is loaded with safetensors or ``torch.load(weights_only=True)``.

Each checkpoint's ``COMPLETE`` marker holds its step and the run id (``run.json``, see
:mod:`opdkit.train.rundir`); discovery, pruning and ``--resume`` only ever see the current run's checkpoints.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_RE = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Parameters that train (all, or the LoRA adapters), as contiguous CPU tensors."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state(generator: torch.Generator | None) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def rank_tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-step_{step:06d}"


def write_rank_state(root: Path, step: int, rank: int, state: dict) -> None:
    """Per-process state (RNG) into the checkpoint being written; call before :func:`commit_checkpoint`."""
    tmp = rank_tmp_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    _torch_save(state, tmp / f"rank{rank}.pt")


def commit_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, trainer_state: dict,
                      keep: int = 2, run_id: str = "") -> Path:
    """Write the shared state and atomically publish ``root/step_N`` (rank 0 only)."""
    root = Path(root)
    tmp = rank_tmp_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(tmp / "model.safetensors"))
    _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
    _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
    _torch_save(trainer_state, tmp / "trainer_state.pt")
    with open(tmp / "COMPLETE", "w") as f:
        f.write(f"{step}\n{run_id}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = root / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep, run_id=run_id)
    return final


def checkpoint_run_id(path: Path) -> str:
    """The run id stamped in a checkpoint's ``COMPLETE`` marker ('' when it has none)."""
    lines = (Path(path) / "COMPLETE").read_text().splitlines()
    return lines[1].strip() if len(lines) > 1 else ""


def complete_checkpoints(root: Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints under ``root``, oldest first; with ``run_id``, only
    that run's."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and (d / "COMPLETE").is_file() and (run_id is None or checkpoint_run_id(d) == run_id):
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(root: Path, run_id: str | None = None) -> Path | None:
    ckpts = complete_checkpoints(root, run_id)
    return ckpts[-1][1] if ckpts else None


def prune(root: Path, keep: int, run_id: str | None = None) -> None:
    """Keep the ``keep`` newest complete checkpoints (of ``run_id``'s run, when given; others are never
    touched); remove leftovers of interrupted writes."""
    for _, d in complete_checkpoints(root, run_id)[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    for d in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0) -> tuple[dict, dict]:
    """Restore model / optimizer / scheduler in place; return (trainer_state, this rank's state)."""
    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} has parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    rank_file = path / f"rank{rank}.pt"
    rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else {}
    return trainer_state, rank_state
