"""SG-OPD (docs/methods.md §5, arXiv 2606.09304): the verifier as a trust signal for the teacher.

- :func:`apply_sign_gate` replaces the OPD advantage of a whole rollout batch by the sign-consistency
  gated advantage (§5.1; math in :mod:`opdkit.gates.sign`). It is computed once per rollout batch,
  before any split into mini- or micro-batches, because the verifier advantage needs whole groups.
- ``loss.advantage = recompute`` (AsyncOPD, arXiv 2606.24143; docs/methods.md §8) needs no batch
  transform: :data:`ADVANTAGES` gives the update ``A = sg(lq − lp_current)`` to compute per micro-batch.
- :func:`teacher_phase` samples teacher responses for the step's prompts during the first
  ``phase_steps`` rollout steps and keeps those the verifier endorses (reward exactly 1, §5.2); they
  enter the update through a token-mean NLL term of weight :func:`alpha_at`, split across the
  mini-batches of a pass like the rollout batch (:func:`nll_share`). They never touch the behaviour
  log-probs, the ratio, or the drift gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from opdkit.gates.sign import sign_agreement, sign_consistency_advantage
from opdkit.losses.opd import opd_advantage
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.sampler import SamplingParams, sample_rollouts


def apply_sign_gate(batch: RolloutBatch, *, lam: float, beta: float, baseline: str) -> tuple[RolloutBatch, dict]:
    """Set ``batch.advantage_BT`` to the §5.1 gated advantage; return telemetry sums as floats.

    Telemetry: ``sg_agree_frac`` (tokens whose teacher sign agrees with the verifier),
    ``sg_adv_agree`` / ``sg_adv_disagree`` (mean gated advantage on each kind of token).
    """
    if batch.rewards_B is None:
        raise ValueError("SG-OPD needs verifier rewards: set rollout.reward")
    mask = batch.response_mask_BT.float()
    a_BT = opd_advantage(batch.teacher_logp_BT, batch.logp_old_BT, mask)
    gated_BT = sign_consistency_advantage(a_BT, batch.rewards_B, batch.group_ids_B, mask, lam=lam, beta=beta,
                                          baseline=baseline)
    batch.advantage_BT = gated_BT
    agree = sign_agreement(a_BT, batch.rewards_B, mask)
    disagree = mask - agree
    n_a, n_d = float(agree.sum()), float(disagree.sum())
    return batch, {
        "sg_agree_frac": n_a / max(n_a + n_d, 1.0),
        "sg_adv_agree": float((gated_BT * agree).sum()) / max(n_a, 1.0),
        "sg_adv_disagree": float((gated_BT * disagree).sum()) / max(n_d, 1.0),
    }


@dataclass(frozen=True)
class AdvantageSpec:
    """One value of ``loss.advantage``: where the advantage the loss reads comes from.

    ``batch(sg)`` builds the transform applied once per rollout batch, before any split (``None``: the
    loss computes ``log q − log π_old`` itself). ``per_update`` (or ``None``) computes the advantage of
    every micro-batch at every update from the current student:
    ``per_update(logp_teacher_BT, logp_current_BT, mask_BT) -> advantage_BT`` (detached, [B,T]).
    """

    batch: Callable
    per_update: Callable | None
    doc: str


# loss.advantage -> AdvantageSpec. The valid names of loss.advantage come from here.
ADVANTAGES: dict[str, AdvantageSpec] = {
    "plain": AdvantageSpec(lambda sg: None, None, "A = sg(lq − lp_old) (§2.1)"),
    "sign_gated": AdvantageSpec(
        lambda sg: partial(apply_sign_gate, lam=sg.lam, beta=sg.beta, baseline=sg.baseline), None,
        "SG-OPD's sign-consistency gated advantage (§5.1)"),
    # AsyncOPD (arXiv 2606.24143): A = sg(lq − lp_current) at every pass; opd_advantage detaches both inputs
    "recompute": AdvantageSpec(lambda sg: None, opd_advantage,
                               "A = sg(lq − lp_current), recomputed at every update (§8, AsyncOPD 2606.24143)"),
}


def _advantage(name: str) -> AdvantageSpec:
    try:
        return ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown loss.advantage {name!r}; valid: {', '.join(ADVANTAGES)}") from None


def batch_advantage(name: str, sg) -> Callable | None:
    """``fn(batch) -> (batch, telemetry)`` for ``loss.advantage = name`` (``sg``: the SG-OPD settings)."""
    return _advantage(name).batch(sg)


def update_advantage(name: str) -> Callable | None:
    """The per-update advantage of ``loss.advantage = name`` (``None``: the advantage is fixed per batch)."""
    return _advantage(name).per_update


def alpha_at(step: int, phase_steps: int, alpha: float) -> float:
    """NLL weight at rollout step ``step``: ``alpha · (1 − step / phase_steps)`` inside the phase, else 0."""
    if phase_steps <= 0 or step >= phase_steps:
        return 0.0
    return alpha * (1.0 - step / phase_steps)


def teacher_phase(teacher, prompts: list[list[int]], answers: list[str], *, samples_per_prompt: int,
                  sampling: SamplingParams, eos_token_ids: list[int], pad_token_id: int, generator, decode,
                  reward_fn) -> tuple[RolloutBatch | None, dict]:
    """Sample ``samples_per_prompt`` teacher responses per prompt; keep the verifier-endorsed ones.

    ``decode(batch) -> list[str]`` turns responses into text; ``reward_fn(texts, answers) -> list[float]``.
    Endorsed means reward exactly 1 (§5: a binary verifier); partial credit (0 < r < 1) is not endorsed.
    ``generator`` should be the teacher's own stream, so the student's later samples do not depend on it.
    Returns (endorsed responses as a batch, or None when none passed; counts).
    """
    params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens,
                            samples_per_prompt=samples_per_prompt)
    tb = sample_rollouts(teacher, prompts, params, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                         generator=generator, answers=answers)
    rewards = reward_fn(decode(tb), tb.answers)
    keep = [i for i, r in enumerate(rewards) if float(r) == 1.0]
    counts = {"teacher_sampled": float(tb.size), "teacher_endorsed": float(len(keep))}
    if not keep:
        return None, counts
    sft = tb.select(keep)
    sft.rewards_B = torch.ones(len(keep))
    return sft, counts


def nll_share(sft: RolloutBatch | None, j: int, k: int) -> RolloutBatch | None:
    """The ``j``-th of ``k`` contiguous shares of the endorsed responses (None: an empty share).

    A pass over the rollout batch makes ``k = minibatches_per_pass`` updates, each on ``1/k`` of the rows;
    the NLL term is split the same way, so every endorsed response counts once per pass and each update
    keeps the ``1 : alpha`` per-token weighting of OPD and NLL that ``k = 1`` has (docs/methods.md §5.2).
    """
    if sft is None or not sft.size:
        return None
    rows = torch.arange(sft.size).tensor_split(k)[j].tolist()
    return sft.select(rows) if rows else None
