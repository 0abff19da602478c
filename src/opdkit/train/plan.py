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


def check_world(cfg: Config, world_size: int) -> None:
    """The batch must split evenly over processes; raise with what to change."""
    from opdkit.config import ConfigError

    if cfg.rollout.prompts_per_step % world_size:
        raise ConfigError(f"rollout.prompts_per_step = {cfg.rollout.prompts_per_step} must be divisible by "
                          f"the {world_size} processes")
    per_proc = cfg.rollout.prompts_per_step // world_size * cfg.rollout.samples_per_prompt
    if per_proc % cfg.train.minibatches_per_pass:
        raise ConfigError(f"train.minibatches_per_pass = {cfg.train.minibatches_per_pass} must divide the "
                          f"{per_proc} sequences each process samples per step")


def format_plan(plan: dict) -> str:
    width = max(len(k) for k in plan)
    return "\n".join(f"  {k.replace('_', ' '):<{width}}  {v:,}" if isinstance(v, int) else
                     f"  {k.replace('_', ' '):<{width}}  {v}" for k, v in plan.items())
