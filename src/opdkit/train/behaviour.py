"""Behaviour log-probs ``log π_old`` recomputed with the training forward (opdkit extension).

The sampler records ``log π_old(y_t | c_t)`` while it decodes (docs/methods.md §0); the update recomputes
``log π_θ`` with the training forward (another kernel path: full-sequence attention, float32 logits,
on a GPU a bf16 decode cache against float32 master weights). Before the first optimizer step θ = θ_old,
so the drift ``log π_θ − log π_old`` (§3, what the clip and the drift gate act on) should be exactly 0;
whatever the two paths disagree by is numerical noise the gate would treat as real drift.

:func:`recompute_behaviour_logprobs` replaces ``logp_old_BT`` by the training forward's values, computed
on exactly the micro-batches of the first pass (same rows, same padding, same chunking), so the first
update sees a drift of exactly 0. It costs one no-grad forward of the student over the rows it recomputes.
The first update of the first pass runs that very forward itself before any optimizer step, so when
nothing reads ``log π_old`` before the update (every variant but SG-OPD, whose sign-gated advantage is
computed on the whole batch first) its rows are skipped here (``skip_minibatches=1``) and that update
takes them from its own forward, detached (:func:`opdkit.train.update.run_update`
``behaviour_from_forward``; verl and TRL do the same on-policy): no extra forward for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.scoring import response_logprobs

# train.behaviour_logprobs -> (bf16 autocast on?) -> recompute? The valid names come from here.
BEHAVIOUR_LOGPROBS: dict[str, Callable[[bool], bool]] = {
    "auto": lambda mixed: mixed,  # the sampler's bf16 copy and cache differ from the autocast update
    "recompute": lambda mixed: True,
    "sampler": lambda mixed: False,
}


@dataclass
class BehaviourDiff:
    """``|log π_sampler − log π_train|`` summed (``abs_sum``) over the response tokens (``tokens``) of the
    rows whose behaviour log-probs came from the training forward: how far the sampler was off. Sums, so
    that the recompute's rows and the first update's rows combine into one mean."""

    abs_sum: float = 0.0
    tokens: float = 0.0

    def add(self, other: BehaviourDiff) -> None:
        self.abs_sum += other.abs_sum
        self.tokens += other.tokens

    def record(self) -> dict:
        """``{"behaviour_logp_abs_diff": mean over the tokens}`` for the step record."""
        return {"behaviour_logp_abs_diff": self.abs_sum / self.tokens if self.tokens else 0.0}


def abs_diff(new_BT: torch.Tensor, old_BT: torch.Tensor, mask_BT: torch.Tensor) -> BehaviourDiff:
    """The :class:`BehaviourDiff` of ``new_BT`` against ``old_BT`` (all [B,T]) on ``mask_BT`` positions."""
    keep_BT = mask_BT.bool()
    diff = (new_BT - old_BT).abs()[keep_BT].double()  # float32 values, summed in float64
    return BehaviourDiff(float(diff.sum()), float(keep_BT.sum()))


def resolve_behaviour_logprobs(name: str, device: torch.device, mixed: bool | None = None) -> bool:
    """Whether ``train.behaviour_logprobs = name`` recomputes ``log π_old`` for a student on ``device``
    trained under bf16 autocast (``mixed``; default: on CUDA, as ``train.autocast=auto``)."""
    try:
        rule = BEHAVIOUR_LOGPROBS[name]
    except KeyError:
        raise ValueError(f"unknown train.behaviour_logprobs {name!r}; valid: {', '.join(BEHAVIOUR_LOGPROBS)}") \
            from None
    return rule(torch.device(device).type == "cuda" if mixed is None else mixed)


def recompute_behaviour_logprobs(model, batch: RolloutBatch, order: list[int], *, minibatches: int,
                                 microbatch_size: int, chunk_size: int, vocab_limit: int | None,
                                 skip_minibatches: int = 0) -> tuple[RolloutBatch, BehaviourDiff]:
    """``batch`` with ``logp_old_BT`` [B,T] from the training forward on the rows of mini-batches
    ``skip_minibatches..minibatches-1`` of the first pass, and their :class:`BehaviourDiff`.

    ``order``: the row order of the first pass; rows ``order[j·S:(j+1)·S]`` (``S = B / minibatches``)
    form update ``j``, cut into micro-batches of ``microbatch_size`` rows, as
    :func:`opdkit.train.update.run_update` does. Rows of skipped mini-batches (the first update's, when it
    takes them from its own forward) and padding positions keep their values. Run it under the same
    autocast as the update; the model's train / eval mode is that of the update (train), restored.
    """
    size = batch.size // minibatches
    logp_BT = batch.logp_old_BT.clone()
    done = order[skip_minibatches * size:minibatches * size]
    was_training = model.training
    model.train()  # the update's mode (dropout is 0 in the models opdkit trains; the mode must match)
    try:
        with torch.no_grad():
            for j in range(skip_minibatches, minibatches):
                mini_rows = order[j * size:(j + 1) * size]
                mini = batch.select(mini_rows)
                for s in range(0, mini.size, microbatch_size):
                    rows = list(range(s, min(s + microbatch_size, mini.size)))
                    micro = mini.select(rows)
                    t = micro.response_ids_BT.shape[1]
                    if t == 0:
                        continue
                    out = response_logprobs(model, micro, chunk_size=chunk_size, vocab_limit=vocab_limit)
                    idx = torch.as_tensor([mini_rows[r] for r in rows], device=logp_BT.device)
                    keep = micro.response_mask_BT.bool().to(logp_BT.device)
                    logp_BT[idx, :t] = torch.where(keep, out.logp_BT.to(logp_BT.device), logp_BT[idx, :t])
    finally:
        model.train(was_training)
    rows_t = torch.as_tensor(done, dtype=torch.long, device=logp_BT.device)
    diff = abs_diff(logp_BT[rows_t], batch.logp_old_BT[rows_t], batch.response_mask_BT[rows_t])
    return replace(batch, logp_old_BT=logp_BT), diff
