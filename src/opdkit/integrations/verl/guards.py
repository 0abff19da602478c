"""Version and setting guards for the verl integration: raise with what to change, never fall back silently."""

from __future__ import annotations

SUPPORTED_VERL_VERSIONS = ("0.9.1",)
SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
SUPPORTED_AGG_MODES = ("token-mean",)


class VerlIntegrationError(RuntimeError):
    """An unsupported verl version or setting for opdkit's verl losses."""


def check_verl_version(version: str) -> None:
    """Raise unless ``version`` is one opdkit.integrations.verl was written and tested against."""
    if version not in SUPPORTED_VERL_VERSIONS:
        raise VerlIntegrationError(
            f"opdkit.integrations.verl supports verl {', '.join(SUPPORTED_VERL_VERSIONS)}, found verl {version}; "
            f"install it with: pip install \"opdkit[verl]\" (or pip install verl=={SUPPORTED_VERL_VERSIONS[-1]}). "
            "Its loss-function signature, padding helpers and engine hook are version-specific.")


def check_actor_setting(strategy: str, loss_agg_mode: str) -> None:
    """Raise on an actor strategy / aggregation mode the exact reduction was not derived for."""
    if strategy not in SUPPORTED_STRATEGIES:
        raise VerlIntegrationError(
            f"opdkit verl losses support actor_rollout_ref.actor.strategy in {SUPPORTED_STRATEGIES}, got "
            f"{strategy!r}; the exact denominator hook exists only for verl's FSDP engine.")
    if loss_agg_mode not in SUPPORTED_AGG_MODES:
        raise VerlIntegrationError(
            f"opdkit verl losses need actor_rollout_ref.actor.loss_agg_mode=token-mean (the paper's reduction, "
            f"methods.md §3), got {loss_agg_mode!r}.")


def check_exact_denominator(needs_hook: bool, hook_active: bool, why: str) -> None:
    """Raise when the loss needs the engine hook's global denominator but runs without it."""
    if needs_hook and not hook_active:
        raise VerlIntegrationError(
            f"{why} needs the opdkit engine hook for an exact denominator (methods.md §3-§4): set the environment "
            "variable VERL_ENGINE_VENDOR=opdkit for the Ray workers (README 'At scale on verl'), or use "
            "gate_scope=sequence and special_token_ids=[] to run on verl's stock engine.")
