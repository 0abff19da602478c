"""The OPD training loop (docs/methods.md §1-§4), top to bottom:

sample prompts -> rollouts (behaviour log-probs recorded) -> verifier rewards -> teacher scores ->
``rollout_passes`` passes over the rollout batch, each split into ``minibatches_per_pass`` optimizer
updates (:func:`opdkit.train.update.run_update`) -> telemetry -> atomic checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from opdkit.config import Config, phase_steps, save_config, to_dict
from opdkit.data import PromptSource, load_problems
from opdkit.gates.registry import SegmentParams, get_segmenter
from opdkit.losses.registry import LossHParams, get_loss
from opdkit.rollout.preflight import check_tokenizers, newline_token_ids
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.train import checkpoint as ckpt
from opdkit.train.divergence import DivergenceMonitor
from opdkit.train.plan import check_world, format_plan, resolve_plan
from opdkit.train.rewards import get_reward
from opdkit.train.rundir import RunDirError, RunRecord, open_run, read_run, truncate_metrics
from opdkit.train.sg_opd import alpha_at, apply_sign_gate, teacher_phase
from opdkit.train.telemetry import MetricsLogger
from opdkit.train.update import UpdateSpec, run_update


class TrainingDiverged(RuntimeError):
    """Too many non-finite updates in a row, or a divergence the monitor detected (message says what)."""


class TrainingInterrupted(Exception):
    """Ctrl-C during training: ``step`` is the rollout step that was running, ``checkpoint_step`` the step
    of the last complete checkpoint of this run (None: none yet), which ``--resume`` continues from."""

    def __init__(self, step: int, checkpoint_step: int | None):
        super().__init__(f"interrupted at rollout step {step}")
        self.step, self.checkpoint_step = step, checkpoint_step


def _open_run_dir(acc, out_dir: Path, cfg: Config, *, resume: bool, overwrite: bool, log) -> RunRecord:
    """Check / create the run directory on the main process (refusing before any model loads), then give
    every process the run id: checkpoints are stamped with it and only this run's are ever read."""
    if acc.is_main_process:
        open_run(out_dir, to_dict(cfg), resume=resume, overwrite=overwrite, log=log)
    acc.wait_for_everyone()
    return read_run(out_dir)


def _accelerator(cfg: Config):
    from accelerate import Accelerator

    return Accelerator(cpu=cfg.train.device == "cpu")


def _dtype(name: str, device: torch.device, *, trains: bool) -> str:
    """``auto``: a trained model keeps float32 master weights (bf16 autocast on GPU); a frozen one is bf16 on GPU."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" and not trains else "float32"


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


def _special_ids(tok, tokens: list[str]) -> tuple[int, ...]:
    ids = []
    for t in tokens:
        tid = tok.convert_tokens_to_ids(t)
        if tid is None or tid == tok.unk_token_id:
            enc = tok(t, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"loss.special_tokens: {t!r} is not a single token of this tokenizer")
            tid = enc[0]
        ids.append(int(tid))
    return tuple(ids)


def build_update_spec(cfg: Config, tok, vocab_limit: int | None) -> UpdateSpec:
    """Resolve the registries and hyper-parameters once (the trainer never branches on names)."""
    return UpdateSpec(
        loss=get_loss(cfg.loss.name),
        hparams=LossHParams(clip_eps=cfg.loss.clip_eps,
                            dual_clip=cfg.loss.dual_clip if cfg.loss.dual_clip > 0 else None,
                            jsd_beta=cfg.loss.jsd_beta, tail=cfg.loss.tail),
        reduction=cfg.loss.reduction,
        reduction_constant=cfg.loss.reduction_constant or None,
        segmenter=get_segmenter(cfg.gate.name),
        segment_params=SegmentParams(
            block_size=cfg.gate.block_size,
            newline_token_ids=tuple(newline_token_ids(tok)) if cfg.gate.name == "newline" else (),
            newline_min_len=cfg.gate.newline_min_len, newline_max_len=cfg.gate.newline_max_len,
            newline_fallback=cfg.gate.newline_fallback),
        tau=cfg.gate.tau, gate_scope=cfg.gate.normalize,
        special_token_ids=_special_ids(tok, cfg.loss.special_tokens),
        microbatch_size=cfg.train.microbatch_size, chunk_size=cfg.train.logprob_chunk_size,
        vocab_limit=vocab_limit, max_grad_norm=cfg.optim.max_grad_norm,
    )


def _apply_lora(cfg: Config, model):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha, lora_dropout=cfg.model.lora_dropout,
                      target_modules=list(cfg.model.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, print_fn=print) -> Path:
    """Run (or resume) OPD training as configured; returns the directory of the final model.

    ``train.output_dir`` must be empty or hold no run, unless ``resume`` (continue this run, with the
    recorded settings) or ``overwrite`` (delete the old run first): see :mod:`opdkit.train.rundir`."""
    acc = _accelerator(cfg)
    rank, world = acc.process_index, acc.num_processes
    is_main = acc.is_main_process
    check_world(cfg, world)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = acc.device
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.train.output_dir)
    ckpt_root = out_dir / "checkpoints"
    log = print_fn if is_main else (lambda *a, **k: None)
    run = _open_run_dir(acc, out_dir, cfg, resume=resume, overwrite=overwrite, log=log)
    if resume and run.finished_step == cfg.train.train_steps and (out_dir / "final").is_dir():
        log(f"--resume: the run in {out_dir} already finished its {run.finished_step} rollout steps; "
            f"nothing to do (raise train.train_steps to extend it)")
        return out_dir / "final"

    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.student, trust_remote_code=cfg.model.trust_remote_code)
    teacher_tok = load_tokenizer(cfg.model.teacher, trust_remote_code=cfg.model.trust_remote_code)
    student = load_model(cfg.model.student, dtype=_dtype(cfg.model.dtype, device, trains=True), device=device,
                         trust_remote_code=cfg.model.trust_remote_code)
    teacher = load_model(cfg.model.teacher, dtype=_dtype(cfg.model.teacher_dtype, device, trains=False), device=device,
                         trust_remote_code=cfg.model.trust_remote_code).eval().requires_grad_(False)
    vocab = check_tokenizers(tok, teacher_tok, student_vocab_size=student.get_output_embeddings().weight.shape[0],
                             teacher_vocab_size=teacher.get_output_embeddings().weight.shape[0])
    if cfg.model.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if cfg.model.lora_r:
        student = _apply_lora(cfg, student)

    problems = load_problems(cfg.data.train_file, data_dir=cfg.data.data_dir, hf_dataset=cfg.data.hf_dataset,
                             hf_split=cfg.data.hf_split, problem_field=cfg.data.problem_field,
                             answer_field=cfg.data.answer_field)
    source = PromptSource.build(problems, tok, template=cfg.data.prompt_template,
                                chat_template=cfg.data.chat_template, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                seed=cfg.train.seed, shuffle=cfg.data.shuffle)

    params = [p for p in student.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    plan = resolve_plan(cfg, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(o.warmup_updates, plan["total_optimizer_updates"], o.schedule))

    spec = build_update_spec(cfg, tok, vocab)
    reward_fn = get_reward(cfg.rollout.reward)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 7919 + rank)
    sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                              max_new_tokens=cfg.rollout.max_new_tokens, min_new_tokens=cfg.rollout.min_new_tokens,
                              samples_per_prompt=cfg.rollout.samples_per_prompt)
    eos_ids = sorted({i for i in [tok.eos_token_id, getattr(student.generation_config, "eos_token_id", None)]
                      if isinstance(i, int)} | set(
        student.generation_config.eos_token_id if isinstance(student.generation_config.eos_token_id, list) else []))

    start_step, bad_streak = 0, 0
    monitor = DivergenceMonitor(factor=cfg.train.divergence_factor,
                                zero_grad_updates=cfg.train.divergence_zero_grad_updates)
    latest = ckpt.latest_checkpoint(ckpt_root, run.run_id) if resume else None
    if latest is not None:
        tstate, rstate = ckpt.load_checkpoint(latest, model=student, optimizer=optimizer, scheduler=scheduler,
                                              rank=rank)
        start_step, bad_streak = int(tstate["step"]), int(tstate["bad_streak"])
        source.load_state(tstate["data"])
        monitor.load_state(tstate.get("divergence", {}))
        ckpt.set_rng_state(rstate["rng"], generator)
        log(f"resumed from {latest} at rollout step {start_step}")
        if start_step > cfg.train.train_steps:
            raise RunDirError(f"--resume: the last checkpoint is at rollout step {start_step}, past "
                              f"train.train_steps = {cfg.train.train_steps}; raise train.train_steps")
    elif resume:
        log(f"--resume: no complete checkpoint of this run in {ckpt_root}; starting from rollout step 0")

    if is_main:
        if resume:  # each rollout step appears once: drop what ran after the checkpoint
            truncate_metrics(out_dir / "metrics.jsonl", start_step)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    log("opdkit train — resolved plan\n" + format_plan(plan) +
        f"\n  prompts available  {len(source):,} ({source.dropped} dropped as longer than "
        f"{cfg.data.max_prompt_tokens} tokens)\n  shared vocabulary  {vocab:,}\n  output  {out_dir}")
    logger = MetricsLogger(out_dir, enabled=is_main, tensorboard=cfg.train.tensorboard,
                           wandb_project=cfg.train.wandb_project, config=to_dict(cfg), resume=resume)
    if resume:
        logger.log("resume", {"from_step": start_step, "run_id": run.run_id,
                              "changed": run.resumes[-1]["changed"] if run.resumes else {}}, step=0)
    bar = None
    if is_main and cfg.train.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.train.train_steps, initial=start_step, desc="opd", unit="step", dynamic_ncols=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    rows_pp = cfg.rollout.prompts_per_step // world * cfg.rollout.samples_per_prompt
    n_phase = phase_steps(cfg)

    def decode(b) -> list[str]:
        return tok.batch_decode([r[m.bool()].tolist() for r, m in zip(b.response_ids_BT, b.response_mask_BT)],
                                skip_special_tokens=True)

    update_idx = start_step * plan["optimizer_updates_per_rollout_step"]

    step = start_step
    try:
        for step in range(start_step, cfg.train.train_steps):
            t0 = time.perf_counter()
            pos = source.next(cfg.rollout.prompts_per_step)[rank::world]
            with autocast:
                batch = sample_rollouts(student, [source.prompt_ids[i] for i in pos], sampling, eos_token_ids=eos_ids,
                                        pad_token_id=tok.pad_token_id, generator=generator,
                                        prompt_indices=[source.indices[i] for i in pos],
                                        group_offset=(step * world + rank) * len(pos),
                                        answers=[source.answers[i] for i in pos])
            t1 = time.perf_counter()
            if reward_fn is not None:
                batch.rewards_B = torch.tensor(reward_fn(decode(batch), batch.answers), dtype=torch.float32,
                                               device=device)
            t2 = time.perf_counter()
            with autocast:
                batch = score_with_teacher(teacher, batch, topk=cfg.loss.topk if spec.loss.needs_support else 0,
                                           microbatch_size=cfg.train.teacher_microbatch_size,
                                           chunk_size=cfg.train.logprob_chunk_size, vocab_limit=vocab)
            sg_rec, sft, alpha = {}, None, alpha_at(step, n_phase, cfg.sg.alpha)
            if cfg.loss.advantage == "sign_gated":
                batch, sg_rec = apply_sign_gate(batch, lam=cfg.sg.lam, beta=cfg.sg.beta, baseline=cfg.sg.baseline)
            if step < n_phase:
                with autocast:
                    sft, counts = teacher_phase(
                        teacher, [source.prompt_ids[i] for i in pos], [source.answers[i] for i in pos],
                        samples_per_prompt=cfg.sg.teacher_samples_per_prompt, sampling=sampling, eos_token_ids=eos_ids,
                        pad_token_id=tok.pad_token_id, generator=generator, decode=decode, reward_fn=reward_fn)
                sg_rec.update(counts, sg_alpha=alpha)
            t3 = time.perf_counter()
            upd = []
            for p in range(cfg.train.rollout_passes):
                order = torch.randperm(rows_pp, generator=torch.Generator().manual_seed(
                    cfg.train.seed * 1_000_003 + step * 101 + p)).tolist()
                size = rows_pp // cfg.train.minibatches_per_pass
                for j in range(cfg.train.minibatches_per_pass):
                    with autocast:
                        m = run_update(student, optimizer, scheduler, batch.select(order[j * size:(j + 1) * size]),
                                       spec, world=acc, sft_batch=sft, sft_weight=alpha)
                    update_idx += 1
                    bad_streak = bad_streak + 1 if m["skipped"] else 0
                    warn = monitor.update(m)
                    logger.log("update", {"step": step, "update": update_idx, "pass": p, **m,
                                          **({"divergence": warn} if warn else {})}, step=update_idx)
                    upd.append(m)
                    if warn:
                        _diverging(warn, step, cfg, bar, log)
                    if bad_streak >= cfg.train.max_bad_updates:
                        raise TrainingDiverged(
                            f"{bad_streak} non-finite updates in a row at rollout step {step}: lower optim.lr, "
                            f"check the teacher's log-probs, or raise train.max_bad_updates")
            t4 = time.perf_counter()
            gen_tokens = float(acc.reduce(torch.tensor(float(batch.num_tokens()), device=device), "sum"))
            solve = float(acc.reduce(batch.rewards_B.float().mean(), "mean")) if batch.rewards_B is not None else None
            # sampled_rkl from the first update: the KL of the rollouts under the policy that sampled them
            # (before this batch moved it); drift from the last update: the most the batch's reuse moved it.
            rec = {"step": step, "loss": sum(u["loss"] for u in upd) / len(upd),
                   "sampled_rkl": upd[0]["sampled_rkl"], "drift_abs_mean": upd[-1]["drift_abs_mean"],
                   "gate_min": min(u["gate_min"] for u in upd), "gate_max": max(u["gate_max"] for u in upd),
                   "gate_std": upd[-1]["gate_std"], "response_len": batch.response_lengths_B.float().mean().item(),
                   "stop_eos": batch.stop_reasons.count("eos") / max(1, batch.size),
                   "stop_length": batch.stop_reasons.count("length") / max(1, batch.size),
                   "solve_rate": solve, "time/sample": t1 - t0, "time/reward": t2 - t1, "time/teacher": t3 - t2,
                   "time/update": t4 - t3, "time/step": t4 - t0, "tokens_per_s": gen_tokens / max(t4 - t0, 1e-9),
                   "skipped_updates": sum(u["skipped"] for u in upd), **sg_rec}
            warn = monitor.step(rec)
            logger.log("step", {**rec, **({"divergence": warn} if warn else {})}, step=update_idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3g}", kl=f"{rec['sampled_rkl']:.3g}",
                                gate=f"{rec['gate_min']:.2f}-{rec['gate_max']:.2f}",
                                solve="-" if solve is None else f"{solve:.2f}",
                                **({"warn": "DIVERGING"} if warn else {}))
            if warn:
                _diverging(warn, step, cfg, bar, log)
            if cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0 \
                    and step + 1 < cfg.train.train_steps:
                _save(acc, ckpt_root, step + 1, student, optimizer, scheduler, source, generator, cfg,
                      {"bad_streak": bad_streak, "divergence": monitor.state()}, run.run_id)
    except KeyboardInterrupt:  # the message, not a traceback, and how to continue
        last = ckpt.latest_checkpoint(ckpt_root, run.run_id)
        raise TrainingInterrupted(step, int(last.name.split("_")[1]) if last else None) from None
    if bar is not None:
        bar.close()
    logger.close()
    final = _save_final(acc, student, tok, out_dir, lora=bool(cfg.model.lora_r))
    if is_main:
        run.finished_step = cfg.train.train_steps
        run.save(out_dir)
    return final


def _diverging(warn: str, step: int, cfg: Config, bar, log) -> None:
    """Say it in the progress line and the log; stop the run when ``train.stop_on_divergence``."""
    msg = f"rollout step {step}: {warn}"
    (bar.write if bar is not None else log)(f"warning: {msg}")
    if cfg.train.stop_on_divergence:
        raise TrainingDiverged(f"diverged at {msg}; lower optim.lr (now {cfg.optim.lr:g}) or "
                               f"train.rollout_passes, or set train.stop_on_divergence=false to go on anyway")


def _save(acc, root, step, model, optimizer, scheduler, source, generator, cfg, extra: dict, run_id: str) -> None:
    if acc.is_main_process:
        ckpt.rank_tmp_dir(root, step).mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    ckpt.write_rank_state(root, step, acc.process_index, {"rng": ckpt.rng_state(generator)})
    acc.wait_for_everyone()
    if acc.is_main_process:
        ckpt.commit_checkpoint(root, step, model=model, optimizer=optimizer, scheduler=scheduler,
                               trainer_state={"step": step, "data": source.state(), **extra}, run_id=run_id,
                               keep=cfg.train.keep_checkpoints)
    acc.wait_for_everyone()


def _save_final(acc, model, tok, out_dir: Path, *, lora: bool) -> Path:
    final = out_dir / "final"
    acc.wait_for_everyone()
    if acc.is_main_process:
        if lora:
            model.save_pretrained(out_dir / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(final, safe_serialization=True)
        tok.save_pretrained(final)
    acc.wait_for_everyone()
    return final
