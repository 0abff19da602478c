"""The resolved training plan: what a config means in sequences, updates and tokens."""

from __future__ import annotations

import math

from opdkit.config import Config


def resolve_plan(cfg: Config, world_size: int = 1) -> dict:
    """Counts implied by ``cfg`` on ``world_size`` processes (each count names its unit)."""
    r, t = cfg.rollout, cfg.train
    rows = r.prompts_per_step * r.samples_per_prompt
    seqs_per_update = rows // t.minibatches_per_pass
    per_proc = seqs_per_update // world_size
    updates_per_step = t.rollout_passes * t.minibatches_per_pass
    return {
        "processes": world_size,
        "sequences_per_rollout_step": rows,
        "prompts_per_process_per_step": r.prompts_per_step // world_size,
        "optimizer_updates_per_rollout_step": updates_per_step,
        "sequences_per_update": seqs_per_update,
        "microbatches_per_update_per_process": math.ceil(per_proc / t.microbatch_size),
        "max_response_tokens_per_update": seqs_per_update * r.max_new_tokens,
        "rollout_steps": t.train_steps,
        "total_optimizer_updates": t.train_steps * updates_per_step,
        "total_sequences_sampled": t.train_steps * rows,
        "max_total_response_tokens": t.train_steps * rows * r.max_new_tokens,
        "loss": cfg.loss.name + ("+sign_gated" if cfg.loss.advantage == "sign_gated" else ""),
        "gate": cfg.gate.name + (f"(size={cfg.gate.block_size})" if cfg.gate.name == "block" else ""),
        "reduction": cfg.loss.reduction,
    }


def _splits(prompts: int, samples: int, minibatches: int, world_size: int) -> bool:
    """Whether ``prompts`` prompts split into whole prompts per process, and each process's
    ``prompts / world_size · samples`` sequences into ``minibatches`` equal updates."""
    return prompts % world_size == 0 and (prompts // world_size * samples) % minibatches == 0


def working_prompts_per_step(cfg: Config, world_size: int, count: int = 4) -> list[int]:
    """The smallest ``count`` values of ``rollout.prompts_per_step`` that split over ``world_size``
    processes (the other settings as in ``cfg``)."""
    r, mb = cfg.rollout, cfg.train.minibatches_per_pass
    return [p for p in range(world_size, world_size * mb * count + 1, world_size)
            if _splits(p, r.samples_per_prompt, mb, world_size)][:count]


def working_process_counts(cfg: Config) -> list[int]:
    """The process counts over which ``cfg``'s rollout batch splits (divisors of ``prompts_per_step``)."""
    r, mb = cfg.rollout, cfg.train.minibatches_per_pass
    return [n for n in range(1, r.prompts_per_step + 1) if _splits(r.prompts_per_step, r.samples_per_prompt, mb, n)]


def check_world(cfg: Config, world_size: int) -> None:
    """The batch must split evenly over processes; raise with what to change.

    Each process samples whole prompts (SG-OPD's verifier baseline is a mean over one prompt's group), so
    ``prompts_per_step`` must be a multiple of the process count, and each process's sequences must split
    into ``minibatches_per_pass`` equal updates."""
    from opdkit.config import ConfigError

    r, t = cfg.rollout, cfg.train
    if _splits(r.prompts_per_step, r.samples_per_prompt, t.minibatches_per_pass, world_size):
        return
    ok = ", ".join(map(str, working_prompts_per_step(cfg, world_size)))
    counts = [str(n) for n in working_process_counts(cfg)]
    procs = " or ".join([", ".join(counts[:-1]), counts[-1]] if len(counts) > 1 else counts)
    keep = (f"; or keep rollout.prompts_per_step = {r.prompts_per_step} and launch {procs} "
            f"process{'es' if counts != ['1'] else ''}" if counts
            else "")
    if r.prompts_per_step % world_size:
        why = (f"rollout.prompts_per_step = {r.prompts_per_step} does not divide over {world_size} processes "
               "(each process samples whole prompts)")
    else:
        per_proc = r.prompts_per_step // world_size * r.samples_per_prompt
        why = (f"train.minibatches_per_pass = {t.minibatches_per_pass} must divide the {per_proc} sequences "
               f"each of the {world_size} processes samples per step")
    raise ConfigError(f"{why}. On {world_size} processes use rollout.prompts_per_step = {ok}, ...{keep}")


def format_plan(plan: dict) -> str:
    width = max(len(k) for k in plan)
    return "\n".join(f"  {k.replace('_', ' '):<{width}}  {v:,}" if isinstance(v, int) else
                     f"  {k.replace('_', ' '):<{width}}  {v}" for k, v in plan.items())
