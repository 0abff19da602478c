"""One optimizer update over a mini-batch of the rollout batch (docs/methods.md §2-§4).

For each micro-batch: current log-probs (chunked LM head) -> base loss from the registry -> drift gate
from the segmenter registry -> ``loss_numerator`` backward. After the last micro-batch the reduction
counts are summed over processes, gradients are summed over processes and divided once by the global
denominator, so the update depends neither on ``microbatch_size`` nor on the number of processes.

``behaviour_from_forward``: the update runs before any optimizer step on its batch (θ = θ_old), so its own
forward, detached, is the training forward's ``log π_old``; it replaces the batch's behaviour log-probs in
everything the update computes (loss, drift gate, metrics: drift exactly 0, gates exactly 1) and goes
back to the caller (:mod:`opdkit.train.behaviour`), which then needs no separate forward for these rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from opdkit.gates.drift import drift_gate, drift_stats, get_gate_normalization, normalize_gate
from opdkit.gates.registry import Segmenter, SegmentParams
from opdkit.losses.masking import special_token_mask
from opdkit.losses.opd import clip_fraction, opd_advantage
from opdkit.losses.reduction import loss_denominator, loss_numerator, reduction_stats
from opdkit.losses.registry import LossHParams, LossInputs, LossSpec
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.scoring import response_logprobs
from opdkit.train.behaviour import BehaviourDiff, abs_diff
from opdkit.train.grad_sync import all_reduce_grads

#: the key of :class:`ForwardBehaviour` in ``run_update``'s metrics (``behaviour_from_forward``); pop it
FORWARD_BEHAVIOUR = "_forward_behaviour"


@dataclass
class UpdateSpec:
    """Everything an update needs besides the model, resolved once from the config."""

    loss: LossSpec
    hparams: LossHParams
    reduction: str = "token-mean"
    reduction_constant: float | None = None
    segmenter: Segmenter | None = None
    segment_params: SegmentParams = SegmentParams()
    tau: float = 1.0
    gate_scope: str = "batch"  # a GATE_NORMALIZATIONS name (gate.normalize)
    gate_statistic: str = "signed_mean"  # a BLOCK_STATISTICS name (gate.statistic)
    # loss.advantage = recompute: fn(logp_teacher_BT, logp_current_BT, mask_BT) -> A_BT, per micro-batch
    token_advantage: Callable | None = None
    special_token_ids: tuple[int, ...] = ()
    microbatch_size: int = 8
    chunk_size: int = 1024
    vocab_limit: int | None = None
    max_grad_norm: float = 1.0


@dataclass
class ForwardBehaviour:
    """What an update with ``behaviour_from_forward`` took as behaviour log-probs: ``logp_old_BT`` [rows, T]
    (the update's batch, its rows and columns; padding keeps the batch's values) and its
    :class:`BehaviourDiff` against the batch's (the sampler's) values over response tokens."""

    logp_old_BT: torch.Tensor
    diff: BehaviourDiff


# metric sums aggregated over micro-batches and processes (divided once at the end). ``gate_*``: the gate as
# the micro-batch applies it (per-row normalised for scope sequence, raw for scope batch, whose division by
# the step-batch mean happens once at the end); ``raw_gate_*``: the raw gate exp(-tau|s_b|).
_SUM_KEYS = ("tokens", "seqs", "loss_num", "clip", "abs_drift", "gate_sum", "gate_sq", "raw_gate_sum",
             "raw_gate_sq", "rkl", "resp_len")


def _all_reduce(t: torch.Tensor, op: str, world) -> torch.Tensor:
    """Sum / min / max over processes (``world``: an accelerate Accelerator, or None for one process)."""
    if world is None or world.num_processes == 1:
        return t
    import torch.distributed as dist

    out = t.clone()
    dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return out


def compute_micro(model, micro: RolloutBatch, spec: UpdateSpec, *, behaviour_from_forward: bool = False,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Forward one micro-batch: (numerator, mask_BT, gate_BT, metric sums). Backward is the caller's.

    ``behaviour_from_forward``: ``logp_old_BT`` on response positions is this forward's ``logp_BT``, detached
    (θ = θ_old); the metric dict's ``"logp_old_BT"`` [B,T] is the behaviour log-prob the micro-batch used."""
    mask = micro.response_mask_BT.float()
    if spec.special_token_ids:
        mask = special_token_mask(micro.response_ids_BT, mask, list(spec.special_token_ids))
    gather = micro.teacher_topk_ids_BTK if spec.loss.needs_support else None
    out = response_logprobs(model, micro, gather_ids_BTK=gather, chunk_size=spec.chunk_size,
                            vocab_limit=spec.vocab_limit)
    if behaviour_from_forward:  # every use below (ratio, advantage, gate, metrics) reads the forward's value
        keep = micro.response_mask_BT.bool()
        micro = replace(micro, logp_old_BT=torch.where(keep, out.logp_BT.detach().to(micro.logp_old_BT.dtype),
                                                       micro.logp_old_BT))
    advantage = micro.advantage_BT  # SG-OPD's gated advantage (§5.1) when set, else the plain one
    if spec.token_advantage is not None:  # recomputed under the current student at every update (§8)
        advantage = spec.token_advantage(micro.teacher_logp_BT, out.logp_BT, mask)
    x = LossInputs(mask_BT=mask, logp_BT=out.logp_BT, logp_old_BT=micro.logp_old_BT,
                   logp_teacher_BT=micro.teacher_logp_BT, student_support_logits_BTK=out.gathered_logits_BTK,
                   student_lse_BT=out.lse_BT, teacher_support_logits_BTK=micro.teacher_topk_logits_BTK,
                   teacher_lse_BT=micro.teacher_lse_BT, advantage_BT=advantage)
    loss_BT = spec.loss.fn(x, spec.hparams)
    gate = raw = None
    if spec.segmenter is not None:
        seg = spec.segmenter(micro.response_ids_BT, mask, spec.segment_params)
        gate = raw = drift_gate(out.logp_BT, micro.logp_old_BT, mask, seg, tau=spec.tau,
                                statistic=spec.gate_statistic)
        if get_gate_normalization(spec.gate_scope).per_sequence:
            gate = normalize_gate(raw, mask, scope="sequence")
    num = loss_numerator(loss_BT, mask, spec.reduction, weights_BT=gate)
    with torch.no_grad():
        logp = out.logp_BT.detach()
        adv = advantage if advantage is not None else opd_advantage(micro.teacher_logp_BT, micro.logp_old_BT, mask)
        ds = drift_stats(logp, micro.logp_old_BT, mask, gate if gate is not None else mask)
        dr = drift_stats(logp, micro.logp_old_BT, mask, raw) if raw is not None and raw is not gate else ds
        valid = mask > 0
        m = {
            "tokens": mask.sum(), "seqs": (mask.sum(-1) > 0).float().sum(), "loss_num": num.detach(),
            "clip": clip_fraction(logp, micro.logp_old_BT, adv, mask, spec.hparams.clip_eps).sum(),
            "abs_drift": ds["abs_drift_sum"], "gate_sum": ds["gate_sum"], "gate_sq": ds["gate_sq_sum"],
            "rkl": torch.where(valid, logp - micro.teacher_logp_BT, 0.0).sum(),
            "resp_len": micro.response_mask_BT.float().sum(),
            "raw_gate_sum": dr["gate_sum"], "raw_gate_sq": dr["gate_sq_sum"],
            "gate_min": ds["gate_min"], "gate_max": ds["gate_max"],
            "raw_gate_min": dr["gate_min"], "raw_gate_max": dr["gate_max"], "logp_old_BT": micro.logp_old_BT,
        }
    return num, mask, gate, m


def _nll_grads(model, sft: RolloutBatch | None, weight: float, spec: UpdateSpec, world) -> tuple[list | None, float]:
    """Gradients of ``weight ·`` token-mean NLL of ``sft`` responses (SG-OPD §5.2), summed over processes.

    Returns (per-parameter gradients, NLL value), or (None, 0.0) when no process has an endorsed
    response. The token count is global, so the term, like the OPD loss, does not depend on
    micro-batching or the number of processes. Every process calls it, with ``sft`` None or empty when
    it has no endorsed response, and joins every collective (skipping them would hang the others).
    """
    has = sft is not None and sft.size > 0
    local = reduction_stats(sft.response_mask_BT) if has else torch.zeros(3, dtype=torch.float64)
    stats = _all_reduce(local.to(_device(model)), "sum", world).cpu()
    if float(stats[0]) == 0:  # the same global count on every process: all of them return here
        return None, 0.0
    den = float(loss_denominator(stats, "token-mean"))
    nll_sum = 0.0
    for s in range(0, sft.size if has else 0, spec.microbatch_size):
        micro = sft.select(list(range(s, min(s + spec.microbatch_size, sft.size))))
        logp = response_logprobs(model, micro, chunk_size=spec.chunk_size, vocab_limit=spec.vocab_limit).logp_BT
        num = -loss_numerator(logp, micro.response_mask_BT, "token-mean")
        (num * (weight / den)).backward()
        nll_sum += float(num.detach())
    all_reduce_grads(model.parameters(), world)
    grads = [p.grad for p in model.parameters()]
    nll = _all_reduce(torch.tensor(nll_sum, device=_device(model)), "sum", world).item() / den
    return grads, nll


def _accumulate(model, batch: RolloutBatch, spec: UpdateSpec, behaviour_from_forward: bool):
    """Forward and backward every micro-batch of ``batch``: (reduction stats, metric sums, gate min and max
    as (applied, raw), :class:`ForwardBehaviour` when ``behaviour_from_forward`` else None)."""
    stats = torch.zeros(3, dtype=torch.float64)
    sums = {k: torch.zeros((), dtype=torch.float64) for k in _SUM_KEYS}
    gmin, gmax = torch.full((2,), math.inf), torch.full((2,), -math.inf)  # (applied gate, raw gate)
    logp_old_BT = batch.logp_old_BT.clone() if behaviour_from_forward else None
    for s in range(0, batch.size, spec.microbatch_size):
        micro = batch.select(list(range(s, min(s + spec.microbatch_size, batch.size))))
        num, mask, gate, m = compute_micro(model, micro, spec, behaviour_from_forward=behaviour_from_forward)
        num.backward()
        stats += reduction_stats(mask, gate).cpu()
        for k in _SUM_KEYS:
            sums[k] += m[k].double().cpu()
        gmin = torch.minimum(gmin, torch.stack([m["gate_min"], m["raw_gate_min"]]).cpu())
        gmax = torch.maximum(gmax, torch.stack([m["gate_max"], m["raw_gate_max"]]).cpu())
        if logp_old_BT is not None:  # micro-batches are trimmed of padding columns: write their prefix
            part_BT = m["logp_old_BT"]
            logp_old_BT[s:s + part_BT.shape[0], :part_BT.shape[1]] = part_BT.to(logp_old_BT.device)
    fb = None
    if logp_old_BT is not None:
        fb = ForwardBehaviour(logp_old_BT, abs_diff(logp_old_BT, batch.logp_old_BT, batch.response_mask_BT))
    return stats, sums, gmin, gmax, fb


def run_update(model, optimizer, scheduler, batch: RolloutBatch, spec: UpdateSpec, *, world=None,
               sft_batch: RolloutBatch | None = None, sft_weight: float = 0.0,
               behaviour_from_forward: bool = False) -> dict:
    """Accumulate gradients over micro-batches, divide by the global denominator, clip, step.

    ``sft_batch`` / ``sft_weight``: verifier-endorsed teacher responses added through a token-mean NLL
    term of that weight (SG-OPD phased teacher sampling, §5.2); they never enter the OPD terms (no
    behaviour log-probs, no gate). Returns metrics (floats). ``metrics["skipped"]`` is 1.0 when the loss
    or gradient was non-finite; then the parameters and the optimizer state are left unchanged.
    ``behaviour_from_forward`` (only for an update before any optimizer step since sampling, θ = θ_old): the
    behaviour log-probs are this update's own forward, detached (module docstring); the metrics then also
    hold ``metrics[FORWARD_BEHAVIOUR]``, a :class:`ForwardBehaviour` the caller pops.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sft_grads, nll = None, 0.0
    if sft_weight > 0:  # the same on every process (a function of the step), so all take this branch
        sft_grads, nll = _nll_grads(model, sft_batch, sft_weight, spec, world)
        optimizer.zero_grad(set_to_none=True)
    stats, sums, gmin, gmax, fb = _accumulate(model, batch, spec, behaviour_from_forward)

    packed = torch.cat([stats, torch.stack([sums[k] for k in _SUM_KEYS])])
    packed = _all_reduce(packed.to(_device(model)), "sum", world).cpu()
    stats, vals = packed[:3], dict(zip(_SUM_KEYS, packed[3:].tolist()))
    gmin = _all_reduce(gmin.to(_device(model)), "min", world).tolist()
    gmax = _all_reduce(gmax.to(_device(model)), "max", world).tolist()
    weighted = spec.segmenter is not None and get_gate_normalization(spec.gate_scope).step_batch
    den = loss_denominator(stats, spec.reduction, constant=spec.reduction_constant, weighted=weighted)
    all_reduce_grads(model.parameters(), world)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.div_(den.to(p.grad.device, p.grad.dtype))
    if sft_grads is not None:
        for p, g in zip(model.parameters(), sft_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    loss = vals["loss_num"] / float(den) + sft_weight * nll
    max_norm = spec.max_grad_norm if spec.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    n = max(vals["tokens"], 1.0)
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "skipped": float(skipped), "lr": scheduler.get_last_lr()[0],
        "clip_frac": vals["clip"] / n, "drift_abs_mean": vals["abs_drift"] / n,
        **_gate_metrics(vals, gmin, gmax, n, batch_scope=weighted),
        "sampled_rkl": vals["rkl"] / n, "response_len": vals["resp_len"] / max(vals["seqs"], 1.0),
        "tokens": vals["tokens"], "teacher_nll": nll, "teacher_nll_weight": sft_weight if sft_grads else 0.0,
    }
    return metrics if fb is None else {**metrics, FORWARD_BEHAVIOUR: fb}


def _gate_metrics(vals: dict, gmin: list, gmax: list, n: float, *, batch_scope: bool) -> dict:
    """Gate telemetry (§4): ``gate_mean|std|min|max`` of the normalised gate that weights the loss, in every
    ``gate.normalize`` scope; ``gate_raw_*`` of the raw gate ``exp(-tau|s_b|)`` (<= 1).

    Scope batch normalises by the step-batch mean ``w̄ = Σ g / N`` (the reduction's weighted denominator),
    so its normalised stats are the raw ones divided by ``w̄``; scope sequence normalised per row already.
    """
    def four(s: float, sq: float, lo: float, hi: float, scale: float = 1.0) -> tuple[float, ...]:
        mean = s / n
        std = math.sqrt(max(sq / n - mean**2, 0.0))
        lo, hi = (x if math.isfinite(x) else 0.0 for x in (lo, hi))
        return mean * scale, std * scale, lo * scale, hi * scale

    raw = four(vals["raw_gate_sum"], vals["raw_gate_sq"], gmin[1], gmax[1])
    if batch_scope:
        wbar = vals["gate_sum"] / n
        norm = four(vals["gate_sum"], vals["gate_sq"], gmin[0], gmax[0], 1.0 / wbar if wbar > 0 else 0.0)
    else:
        norm = four(vals["gate_sum"], vals["gate_sq"], gmin[0], gmax[0])
    names = ("mean", "std", "min", "max")
    return {**{f"gate_{k}": v for k, v in zip(names, norm)}, **{f"gate_raw_{k}": v for k, v in zip(names, raw)}}


def _device(model) -> torch.device:
    return next(model.parameters()).device
