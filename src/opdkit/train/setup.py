"""Everything a rollout step needs, built once from the config (docs/methods.md §1-§5).

:func:`build_trainer` loads the student and the teacher, the prompts, the optimizer and schedule, and
resolves every name in the config through its registry (loss, gate, reward, advantage), so the step
code in :mod:`opdkit.train.step` never looks at a config string. ``opdkit bench step`` builds the same
:class:`Trainer` from random models with :func:`trainer_from_parts` and runs the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from opdkit.config import Config, phase_steps
from opdkit.data import PromptSource, load_problems
from opdkit.gates.registry import get_segmenter
from opdkit.losses.registry import LossHParams, get_loss
from opdkit.rollout.preflight import check_tokenizers
from opdkit.rollout.sampler import SamplingParams
from opdkit.runtime.gate import segment_params
from opdkit.runtime.graders import reward_fn as get_reward
from opdkit.runtime.models import (
    ADAMW,
    AUTOCAST,
    auto_dtype,
    eos_token_ids,
    load_model,
    load_tokenizer,
    single_token_ids,
)
from opdkit.train.behaviour import resolve_behaviour_logprobs
from opdkit.train.divergence import DivergenceMonitor
from opdkit.train.plan import resolve_plan
from opdkit.train.sg_opd import batch_advantage, update_advantage
from opdkit.train.update import UpdateSpec

# Seeds of the random streams, derived from train.seed so that a run is reproducible and a resume
# restores them. Each process samples from its own stream (the rank is added), and the shuffle of a
# rollout batch before each pass uses a generator of its own seeded by (seed, step, pass): the order
# then depends neither on how many random numbers sampling drew nor on where a resumed run restarted.
# SG-OPD's teacher sampling (§5.2) draws from a generator of its own, seeded by (seed, step, rank): turning
# it on leaves the student's rollout stream untouched, and a resume needs no extra state for it.
SAMPLER_SEED_MULT = 7919  # a prime: seed * 7919 + rank never collides for rank < 7919
PASS_SEED_MULT, STEP_SEED_MULT = 1_000_003, 101
TEACHER_SEED_OFFSET = 1 << 40  # keeps teacher-sampling seeds apart from the other streams' seeds


def sampler_seed(seed: int, rank: int) -> int:
    return seed * SAMPLER_SEED_MULT + rank


def pass_order_seed(seed: int, step: int, pass_idx: int) -> int:
    return seed * PASS_SEED_MULT + step * STEP_SEED_MULT + pass_idx


def teacher_sample_seed(seed: int, step: int, rank: int) -> int:
    return TEACHER_SEED_OFFSET + (seed * PASS_SEED_MULT + step) * SAMPLER_SEED_MULT + rank


def pass_order(seed: int, step: int, pass_idx: int, rows: int) -> list[int]:
    """The shuffled row order of pass ``pass_idx`` over the rollout batch of ``step`` (``rows`` rows)."""
    gen = torch.Generator().manual_seed(pass_order_seed(seed, step, pass_idx))
    return torch.randperm(rows, generator=gen).tolist()


@dataclass
class Trainer:
    """The models, optimizer and resolved settings of one training run (or one benchmark)."""

    cfg: Config
    acc: Any  # accelerate.Accelerator, or None for one process without accelerate (bench)
    student: torch.nn.Module
    teacher: torch.nn.Module
    tok: Any  # the student's tokenizer (None in the random-weight benchmark: no rewards to decode)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    spec: UpdateSpec
    sampling: SamplingParams
    eos_ids: list[int]
    pad_id: int
    reward_fn: Callable | None
    advantage_fn: Callable | None  # batch-level advantage (SG-OPD's sign gate), None for the plain one
    generator: torch.Generator
    vocab: int | None
    monitor: DivergenceMonitor
    phase_steps: int = 0
    rank: int = 0
    world: int = 1
    bad_streak: int = 0
    update_idx: int = 0
    recompute_logp_old: bool = False  # train.behaviour_logprobs resolved for the student's precision
    mixed: bool = False  # train.autocast resolved for the student's device

    @property
    def autocast(self):
        """bf16 autocast (float32 master weights) when ``train.autocast`` says so (default: on GPU only)."""
        dev = next(self.student.parameters()).device
        return torch.autocast(dev.type, dtype=torch.bfloat16) if self.mixed else nullcontext()

    @property
    def rows_per_process(self) -> int:
        return self.cfg.rollout.prompts_per_step // self.world * self.cfg.rollout.samples_per_prompt


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the base lr after ``u`` optimizer updates: linear warm-up, then the schedule."""

    def f(u: int) -> float:
        if warmup and u < warmup:
            return (u + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (u - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def build_update_spec(cfg: Config, tok, vocab_limit: int | None) -> UpdateSpec:
    """Resolve the loss and gate registries and their hyper-parameters once."""
    return UpdateSpec(
        loss=get_loss(cfg.loss.name),
        hparams=LossHParams(clip_eps=cfg.loss.clip_eps,
                            dual_clip=cfg.loss.dual_clip if cfg.loss.dual_clip > 0 else None,
                            jsd_beta=cfg.loss.jsd_beta, tail=cfg.loss.tail, tis_cap=cfg.loss.tis_cap),
        reduction=cfg.loss.reduction,
        reduction_constant=cfg.loss.reduction_constant or None,
        segmenter=get_segmenter(cfg.gate.name),
        segment_params=segment_params(cfg.gate, tok),
        tau=cfg.gate.tau, gate_scope=cfg.gate.normalize, gate_statistic=cfg.gate.statistic,
        token_advantage=update_advantage(cfg.loss.advantage),
        special_token_ids=tuple(single_token_ids(tok, cfg.loss.special_tokens)) if cfg.loss.special_tokens else (),
        microbatch_size=cfg.train.microbatch_size, chunk_size=cfg.train.logprob_chunk_size,
        vocab_limit=vocab_limit, max_grad_norm=cfg.optim.max_grad_norm,
    )


def sampling_params(cfg: Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                          min_new_tokens=r.min_new_tokens, samples_per_prompt=r.samples_per_prompt,
                          max_cache_gb=r.max_cache_gb, static_decode=r.static_decode)


def _apply_lora(cfg: Config, model):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                      target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def load_models(cfg: Config, device: torch.device):
    """(student, teacher, student tokenizer, shared vocabulary size). The student keeps float32 master
    weights; the frozen teacher is bf16 on a GPU ("auto", see :mod:`opdkit.runtime.models`).

    ``model.teacher = self`` loads ``model.student`` again as the frozen teacher (the initial student, also on
    resume); ``self-current`` returns the student itself, which teacher scoring runs under ``no_grad``."""
    m = cfg.model
    tok = load_tokenizer(m.tokenizer or m.student, trust_remote_code=m.trust_remote_code)
    teacher_path = m.student if m.teacher == "self" else m.teacher
    student = load_model(m.student, dtype=auto_dtype(m.dtype, device, trains=True), device=device,
                         trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation)
    teacher, vocab = student, student.get_output_embeddings().weight.shape[0]
    if m.teacher != "self-current":
        teacher_tok = load_tokenizer(m.tokenizer or m.student if m.teacher == "self" else teacher_path,
                                     trust_remote_code=m.trust_remote_code)
        teacher = load_model(teacher_path, dtype=auto_dtype(m.teacher_dtype, device), device=device,
                             trust_remote_code=m.trust_remote_code, attn_implementation=m.attn_implementation
                             ).eval().requires_grad_(False)
        # One vocabulary for both: the teacher scores the student's token ids (a padded embedding is cut).
        vocab = check_tokenizers(tok, teacher_tok, student_vocab_size=vocab,
                                 teacher_vocab_size=teacher.get_output_embeddings().weight.shape[0])
    if m.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if m.lora_r:
        student = _apply_lora(cfg, student)
        teacher = student if m.teacher == "self-current" else teacher
    return student, teacher, tok, vocab


def prompt_source(cfg: Config, tok) -> PromptSource:
    d = cfg.data
    problems = load_problems(d.train_file, data_dir=d.data_dir, hf_dataset=d.hf_dataset, hf_split=d.hf_split,
                             problem_field=d.problem_field, answer_field=d.answer_field)
    return PromptSource.build(problems, tok, template=d.prompt_template, chat_template=d.chat_template,
                              max_prompt_tokens=d.max_prompt_tokens, seed=cfg.train.seed, shuffle=d.shuffle,
                              context=cfg.teacher.context, hint_lines=cfg.teacher.hint_lines)


def trainer_from_parts(cfg: Config, student, teacher, tok, *, vocab: int | None, acc=None, eos_ids=None,
                       pad_id: int | None = None) -> Trainer:
    """A :class:`Trainer` around given models: optimizer, schedule, registries and random streams."""
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    o = cfg.optim
    params = [p for p in student.parameters() if p.requires_grad]
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                  fused=ADAMW[o.adamw](device) or None)  # None: torch's default for the device
    total = resolve_plan(cfg, world)["total_optimizer_updates"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_updates, total, o.schedule))
    mixed = AUTOCAST[cfg.train.autocast](device)  # bf16 autocast of every forward (and a bf16 sampling copy)
    return Trainer(
        cfg=cfg, acc=acc, student=student, teacher=teacher, tok=tok, optimizer=optimizer, scheduler=scheduler,
        spec=build_update_spec(cfg, tok, vocab), sampling=sampling_params(cfg),
        eos_ids=eos_ids if eos_ids is not None else eos_token_ids(student, tok),
        pad_id=pad_id if pad_id is not None else tok.pad_token_id,
        reward_fn=get_reward(cfg.rollout.reward), advantage_fn=batch_advantage(cfg.loss.advantage, cfg.sg),
        generator=torch.Generator(device=device).manual_seed(sampler_seed(cfg.train.seed, rank)),
        vocab=vocab, monitor=DivergenceMonitor(factor=cfg.train.divergence_factor,
                                               zero_grad_updates=cfg.train.divergence_zero_grad_updates),
        phase_steps=phase_steps(cfg), rank=rank, world=world,
        mixed=mixed, recompute_logp_old=resolve_behaviour_logprobs(cfg.train.behaviour_logprobs, device, mixed))
