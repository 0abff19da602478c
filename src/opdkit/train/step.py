"""One rollout step of on-policy distillation (docs/methods.md §1-§5), in the order it happens:

1. **sample**: the student writes ``samples_per_prompt`` responses per prompt and records the
   behaviour log-probs ``log π_old`` of what it sampled (the reference of the clip ratio and the drift);
   with ``train.behaviour_logprobs`` recomputing, the training forward replaces them: one no-grad forward
   here for the rows of the first pass's later updates, while the first update takes its rows' values
   from its own forward (step 5; :mod:`opdkit.train.behaviour`). SG-OPD reads ``log π_old`` in step 4,
   before any update, so there every row is recomputed here;
2. **reward**: the verifier grades them (only SG-OPD and telemetry use the reward; plain OPD does not);
3. **teacher**: the teacher scores every sampled token (``log q``; its top-K for LSM);
4. **advantage**: SG-OPD replaces ``log q − log π_old`` by its sign-gated advantage, on whole groups,
   before any split; SG-OPD's phased teacher samples are drawn here too;
5. **updates**: ``rollout_passes`` passes over the batch, each shuffled and split into
   ``minibatches_per_pass`` optimizer updates; the batch is reused, so the student drifts from the
   policy that sampled it, which is what the clip and the drift gate act on;
6. **record**: one line of telemetry for the step.

``opdkit train`` (:mod:`opdkit.train.loop`) and ``opdkit bench step`` run exactly this function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.sampler import sample_rollouts
from opdkit.rollout.teacher import score_with_teacher, with_prompts
from opdkit.train.behaviour import BehaviourDiff, recompute_behaviour_logprobs
from opdkit.train.setup import Trainer, pass_order, teacher_sample_seed
from opdkit.train.sg_opd import alpha_at, nll_share, teacher_phase
from opdkit.train.update import FORWARD_BEHAVIOUR, ForwardBehaviour, run_update


@dataclass
class StepPrompts:
    """This process's prompts of one rollout step (token ids, reference answers, dataset indices)."""

    ids: list[list[int]]
    answers: list[str] | None = None
    indices: list[int] | None = None
    teacher_ids: list[list[int]] | None = None  # the teacher's prompts under teacher.context (None: ids)


def rollout_step(t: Trainer, step: int, prompts: StepPrompts, on_update=None) -> dict:
    """Run one rollout step; return its record. ``on_update(metrics)`` is called after every optimizer
    update (the trainer logs it and checks for divergence there)."""
    t0 = time.perf_counter()
    batch = sample(t, step, prompts)
    diff, from_forward = None, behaviour_from_forward(t)
    if t.recompute_logp_old:
        batch, diff = recompute_logp_old(t, step, batch, skip_minibatches=int(from_forward))
    t1 = time.perf_counter()
    if t.reward_fn is not None:
        batch.rewards_B = torch.tensor(t.reward_fn(batch.decode(t.tok), batch.answers), dtype=torch.float32,
                                       device=batch.response_ids_BT.device)
    t2 = time.perf_counter()
    with t.autocast:
        batch = score_with_teacher(t.teacher, batch, topk=t.cfg.loss.topk if t.spec.loss.needs_support else 0,
                                   microbatch_size=t.cfg.train.teacher_microbatch_size,
                                   chunk_size=t.cfg.train.logprob_chunk_size, vocab_limit=t.vocab,
                                   prompts=teacher_rows(prompts, t.sampling.samples_per_prompt))
    sg_rec = {}
    if t.advantage_fn is not None:
        batch, sg_rec = t.advantage_fn(batch)
    sft, alpha, counts = endorsed_teacher_samples(t, step, prompts)
    sg_rec.update(counts)
    t3 = time.perf_counter()
    upd = update_passes(t, step, batch, sft, alpha, on_update, behaviour=diff if from_forward else None)
    t4 = time.perf_counter()
    times = {"time/sample": t1 - t0, "time/reward": t2 - t1, "time/teacher": t3 - t2, "time/update": t4 - t3}
    return step_record(t, step, batch, upd, times) | sg_rec | (diff.record() if diff is not None else {})


def behaviour_from_forward(t: Trainer) -> bool:
    """Whether the first update takes its rows' recomputed ``log π_old`` from its own forward (θ = θ_old
    there) instead of a separate no-grad forward: when ``log π_old`` is recomputed and nothing reads it
    before the update (SG-OPD's batch-level sign-gated advantage does, so SG-OPD recomputes every row)."""
    return t.recompute_logp_old and t.advantage_fn is None


def teacher_rows(prompts: StepPrompts, samples_per_prompt: int) -> list[list[int]] | None:
    """The teacher's prompt of every rollout row (rows are prompt-major), or None when it is the student's."""
    if prompts.teacher_ids is None:
        return None
    return [p for p in prompts.teacher_ids for _ in range(samples_per_prompt)]


def sample(t: Trainer, step: int, prompts: StepPrompts) -> RolloutBatch:
    """The student's rollouts with their behaviour log-probs. Group ids are unique over steps and
    processes (SG-OPD's verifier baseline is a mean over one prompt's group)."""
    with t.autocast:
        return sample_rollouts(t.student, prompts.ids, t.sampling, eos_token_ids=t.eos_ids, pad_token_id=t.pad_id,
                               generator=t.generator, prompt_indices=prompts.indices,
                               group_offset=(step * t.world + t.rank) * len(prompts.ids), answers=prompts.answers)


def recompute_logp_old(t: Trainer, step: int, batch: RolloutBatch, *, skip_minibatches: int = 0,
                       ) -> tuple[RolloutBatch, BehaviourDiff]:
    """``train.behaviour_logprobs``: behaviour log-probs from the training forward, on the micro-batches of
    the first pass, so that the first update's drift is exactly 0 (:mod:`opdkit.train.behaviour`); the
    first ``skip_minibatches`` updates' rows are left to those updates' own forward."""
    if skip_minibatches >= t.cfg.train.minibatches_per_pass:  # one update per pass: nothing to recompute here
        return batch, BehaviourDiff()
    order = pass_order(t.cfg.train.seed, step, 0, t.rows_per_process)
    with t.autocast:
        return recompute_behaviour_logprobs(t.student, batch, order, minibatches=t.cfg.train.minibatches_per_pass,
                                            microbatch_size=t.spec.microbatch_size, chunk_size=t.spec.chunk_size,
                                            vocab_limit=t.spec.vocab_limit, skip_minibatches=skip_minibatches)


def endorsed_teacher_samples(t: Trainer, step: int, prompts: StepPrompts):
    """SG-OPD §5.2: during the first ``phase_steps`` rollout steps the teacher answers the same prompts and
    the verifier-endorsed answers enter the update through an NLL term of decaying weight ``alpha``.
    Returns (endorsed batch or None, alpha, counts); outside the phase (and for every other variant)
    (None, 0.0, {}). The teacher samples from its own generator, so the student's stream is untouched."""
    if step >= t.phase_steps:
        return None, 0.0, {}
    alpha = alpha_at(step, t.phase_steps, t.cfg.sg.alpha)
    gen = torch.Generator(device=t.generator.device).manual_seed(teacher_sample_seed(t.cfg.train.seed, step, t.rank))
    with t.autocast:
        sft, counts = teacher_phase(
            t.teacher, prompts.teacher_ids or prompts.ids, prompts.answers,
            samples_per_prompt=t.cfg.sg.teacher_samples_per_prompt,
            sampling=t.sampling, eos_token_ids=t.eos_ids, pad_token_id=t.pad_id, generator=gen,
            decode=lambda b: b.decode(t.tok), reward_fn=t.reward_fn)
    if sft is not None and prompts.teacher_ids is not None:  # the teacher wrote under its context; the student
        sft = with_prompts(sft, [prompts.ids[g] for g in sft.group_ids_B.tolist()], t.pad_id)  # learns its prompt
    return sft, alpha, {**counts, "sg_alpha": alpha}


def update_passes(t: Trainer, step: int, batch: RolloutBatch, sft, alpha: float, on_update=None, *,
                  behaviour: BehaviourDiff | None = None) -> list[dict]:
    """``rollout_passes`` passes over the batch, each a fresh shuffle cut into ``minibatches_per_pass``
    optimizer updates; SG-OPD's endorsed responses are cut into as many shares, one per update, so the
    NLL term counts once per pass (§5.2). Returns every update's metrics, in order.

    ``behaviour`` (given when the recompute skipped the first update's rows): the first update takes their
    ``log π_old`` from its own forward; they are written into the batch for the later updates, and their
    ``|sampler − forward|`` sums are added to ``behaviour``."""
    rows, passes = t.rows_per_process, t.cfg.train.rollout_passes
    k = t.cfg.train.minibatches_per_pass
    size = rows // k
    out = []
    for p in range(passes):
        order = pass_order(t.cfg.train.seed, step, p, rows)
        for j in range(k):
            mini_rows = order[j * size:(j + 1) * size]
            first = behaviour is not None and p == 0 and j == 0
            with t.autocast:
                m = run_update(t.student, t.optimizer, t.scheduler, batch.select(mini_rows), t.spec, world=t.acc,
                               sft_batch=nll_share(sft, j, k), sft_weight=alpha, behaviour_from_forward=first)
            if first:
                batch = with_forward_behaviour(batch, mini_rows, m.pop(FORWARD_BEHAVIOUR), behaviour)
            t.update_idx += 1
            m["pass"] = p
            out.append(m)
            if on_update is not None:
                on_update(m)
    return out


def with_forward_behaviour(batch: RolloutBatch, rows: list[int], fb: ForwardBehaviour,
                           behaviour: BehaviourDiff) -> RolloutBatch:
    """``batch`` with rows ``rows`` of ``logp_old_BT`` [B,T] set to what the first update took from its own
    forward (``fb.logp_old_BT`` [len(rows), T'], T' <= T: the mini-batch is trimmed of padding columns);
    adds ``fb``'s sums to ``behaviour``."""
    logp_BT = batch.logp_old_BT.clone()
    idx = torch.as_tensor(rows, dtype=torch.long, device=logp_BT.device)
    logp_BT[idx, :fb.logp_old_BT.shape[1]] = fb.logp_old_BT.to(logp_BT.device)
    behaviour.add(fb.diff)
    return replace(batch, logp_old_BT=logp_BT)


def step_record(t: Trainer, step: int, batch: RolloutBatch, upd: list[dict], times: dict) -> dict:
    """One telemetry line for the step, summed or averaged over processes where it differs by process.

    ``sampled_rkl`` comes from the first update: the reverse KL of the rollouts under the policy that
    sampled them, before this batch moved it (what "the student is getting closer to the teacher"
    means). ``drift_abs_mean`` and ``gate_std`` come from the last update: by then the batch has been
    reused the most, so that is the largest drift the gate saw. Gate min / max span all updates; ``gate_*``
    are of the normalised gate that weights the loss, ``gate_raw_*`` of the raw gate (:mod:`opdkit.train.update`).
    ``drift_pass0`` is the mean |drift| of the first update, before any optimizer step on this batch: exactly
    0 when the behaviour log-probs are recomputed (``train.behaviour_logprobs``), else the numerical
    disagreement between the sampler and the training forward."""
    device = batch.response_ids_BT.device
    tokens = float(batch.num_tokens())
    solve = None
    if t.acc is not None:
        tokens = float(t.acc.reduce(torch.tensor(tokens, device=device), "sum"))
        if batch.rewards_B is not None:
            solve = float(t.acc.reduce(batch.rewards_B.float().mean(), "mean"))
    elif batch.rewards_B is not None:
        solve = float(batch.rewards_B.float().mean())
    wall = sum(times.values())
    return {"step": step, "loss": sum(u["loss"] for u in upd) / len(upd),
            "sampled_rkl": upd[0]["sampled_rkl"], "drift_abs_mean": upd[-1]["drift_abs_mean"],
            "drift_pass0": upd[0]["drift_abs_mean"],
            "gate_min": min(u["gate_min"] for u in upd), "gate_max": max(u["gate_max"] for u in upd),
            "gate_std": upd[-1]["gate_std"], "gate_raw_min": min(u["gate_raw_min"] for u in upd),
            "gate_raw_max": max(u["gate_raw_max"] for u in upd), "gate_raw_std": upd[-1]["gate_raw_std"],
            "response_len": batch.response_lengths_B.float().mean().item(),
            "stop_eos": batch.stop_reasons.count("eos") / max(1, batch.size),
            "stop_length": batch.stop_reasons.count("length") / max(1, batch.size),
            "solve_rate": solve, **times, "time/step": wall, "tokens_per_s": tokens / max(wall, 1e-9),
            "generated_tokens": tokens, "skipped_updates": sum(u["skipped"] for u in upd)}
