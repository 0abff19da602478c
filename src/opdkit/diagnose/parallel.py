"""Probe rollouts in this process or in ``workers`` single-thread processes (same results either way).

Every node has its own generator seeded from ``(seed, rollout, position)``
(:func:`opdkit.diagnose.nodes.node_seed`), so splitting the rollouts over processes changes nothing but
the wall time. Small models are overhead-bound: on a 2-core machine two single-thread processes use
the cores better than one process with two threads. Worker processes are spawned (never forked) and
load the models themselves; the grader must be a name (``chain``, ``math``) or a picklable function.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from opdkit.diagnose.nodes import NodeProbe, ProbeParams, probe_rollout


@dataclass(frozen=True)
class ProbeJob:
    """One rollout to probe: its index, prompt and response ids (no padding) and reference answer."""

    rollout: int
    prompt_ids: list[int]
    response_ids: list[int]
    answer: str
    teacher_prompts: dict = field(default_factory=dict)  # {teacher: prompt ids} for teachers with a context


@dataclass
class ProbeContext:
    """What probing needs; ``student_path`` / ``teacher_paths`` / ``load`` let a worker rebuild the models."""

    student_path: str
    teacher_paths: dict[str, str]
    load: dict
    grader: str | Callable
    params: ProbeParams
    eos_token_ids: list[int]
    pad_token_id: int
    vocab: int
    seed: int
    models: dict = field(default_factory=dict)  # loaded in this process: student, teachers, tok, grade


def _load(ctx: ProbeContext) -> dict:
    from opdkit.runtime.graders import as_reward_fn
    from opdkit.runtime.models import load_frozen, load_tokenizer

    if not ctx.models:
        remote_code = ctx.load.get("trust_remote_code", False)
        loaded = {ctx.student_path: load_frozen(ctx.student_path, **ctx.load)}  # one copy per path (self-teachers)
        for p in ctx.teacher_paths.values():
            if p not in loaded:
                loaded[p] = load_frozen(p, **ctx.load)
        ctx.models = {"student": loaded[ctx.student_path],
                      "teachers": {n: loaded[p] for n, p in ctx.teacher_paths.items()},
                      "tok": load_tokenizer(ctx.student_path, trust_remote_code=remote_code),
                      "grade": as_reward_fn(ctx.grader)}
    return ctx.models


def probe_job(ctx: ProbeContext, job: ProbeJob) -> list[NodeProbe]:
    m = _load(ctx)
    tok = m["tok"]
    return probe_rollout(m["student"], m["teachers"], job.prompt_ids, job.response_ids, job.answer,
                         grade=m["grade"], decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                         params=ctx.params, eos_token_ids=ctx.eos_token_ids, pad_token_id=ctx.pad_token_id,
                         vocab=ctx.vocab, seed=ctx.seed, rollout=job.rollout, teacher_prompts=job.teacher_prompts)


_WORKER: dict = {}


def _init_worker(ctx: ProbeContext) -> None:
    torch.set_num_threads(1)
    _WORKER["ctx"] = ctx
    _load(ctx)


def _run_worker(job: ProbeJob) -> list[NodeProbe]:
    return probe_job(_WORKER["ctx"], job)


@contextlib.contextmanager
def probe_stream(ctx: ProbeContext, jobs: list[ProbeJob], workers: int = 1) -> Iterator[Iterator[list[NodeProbe]]]:
    """An iterator over the probes of ``jobs`` in order (``workers > 1``: a spawned process pool)."""
    if workers <= 1 or len(jobs) <= 1:
        yield (probe_job(ctx, j) for j in jobs)
        return
    remote = ProbeContext(ctx.student_path, ctx.teacher_paths, {**ctx.load, "device": str(ctx.load["device"])},
                          ctx.grader, ctx.params, ctx.eos_token_ids, ctx.pad_token_id, ctx.vocab, ctx.seed)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(remote,)) as ex:
        yield ex.map(_run_worker, jobs)
