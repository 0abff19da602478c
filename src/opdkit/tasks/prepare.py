"""Build the CPU miniature's shipped checkpoints: an SFT teacher and an early-stopped SFT student.

Both are tiny Qwen3 decoders trained with teacher-forced cross-entropy on the response tokens only
(solution + eos after the plain prompt ``format_prompt(problem)``), AdamW, linear warmup then a constant
(phase A) or cosine (phase B) learning rate. Each step is a batch of problems that share one ``k``
(drawn uniformly from ``TRAIN_K_RANGE``); only traces with a made-up extra step (``slips``, the
teacher's last phase) make a batch ragged, and it is right-padded. The student is stopped early, while it
solves short chains but few long ones, so it has headroom for OPD.

    python -m opdkit.tasks.prepare --out src/opdkit/assets/miniature

writes ``teacher/`` and ``student/`` (``save_pretrained``: safetensors + tokenizer), ``data/`` (the
four benchmarks and training prompts as JSON Lines) and ``prepare.json`` (settings and measured
accuracies). Fixed seeds and data order make it reproducible for a given thread count (the default
single thread); the shipped files' reproducibility check and build times are in the README ("The CPU
miniature"). Both models train on the countdown format of :mod:`opdkit.tasks.chain` with its bijective
multipliers; the data streams are pinned by digest in the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from opdkit.runtime.models import TinyQwen3Spec
from opdkit.tasks.chain import (
    ANSWER_PREFIX,
    BENCHMARK_KS,
    BENCHMARK_ROLE,
    LETTERS,
    MAX_K,
    MOD,
    TRAIN_K_RANGE,
    _held_out_problems,
    apply_op,
    benchmarks,
    chain_tokenizer,
    format_prompt,
    grade_chain,
    make_train_prompts,
    parse_problem,
    random_op,
    random_problem,
    tag,
    trace_length,
    write_jsonl,
)

VOCAB = 46
TEACHER_SPEC = TinyQwen3Spec(vocab_size=VOCAB, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=32, intermediate_size=384, max_position_embeddings=1024)
STUDENT_SPEC = TinyQwen3Spec(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, intermediate_size=192, max_position_embeddings=1024)
TEACHER_STEPS = 700
STUDENT_STEPS = 1200
TEACHER_LR, STUDENT_LR = 3e-3, 3e-3
BATCH_SIZE = 32
WARMUP = 50


def _draws(problem: str, countdown: bool = True) -> tuple:
    """A problem's random draws (start, ops in execution order, listed tags as steps): the same problem
    in either format."""
    x, ops = parse_problem(problem, countdown)
    k = len(ops)
    steps = {tag(i, k, countdown): i for i in range(k)}
    return x, tuple(ops), tuple(steps[g[0]] for g in problem.split()[1:])


def slipped_solution(problem: str, rng: random.Random, p_slip: float = 0.0,
                     p_extra: float = 0.0, countdown: bool = True) -> list[tuple[str, bool]]:
    """The solution of ``problem`` as ``[(text, trained)]`` segments, with injected off-track parts.

    With probability ``p_slip`` one step's result is wrong (a random other value) and the trace goes on
    from the written value; with probability ``p_extra`` one made-up line follows the last step (the
    next letter, or one of the prompt's, with a random op) and the answer is still the last step's
    state. Injected text is not trained on (``trained=False``: the model is not taught to slip), what
    follows it is: the teacher learns to go on correctly after a slip and to answer after an extra
    step, the off-track prefixes on which on-policy distillation asks it. Both 0: ``solve(p)`` line by
    line, all trained.
    """
    x, ops = parse_problem(problem, countdown)
    k = len(ops)
    slip_at = rng.randrange(len(ops)) if rng.random() < p_slip else -1
    extra = rng.random() < p_extra
    segs: list[tuple[str, bool]] = []
    for i, (op, d) in enumerate(ops):
        y = apply_op(x, op, d)
        head = f"{x:02d} {tag(i, k, countdown)}{op}{d}="
        if i == slip_at:
            y = (y + rng.randrange(1, MOD)) % MOD
            segs += [(head, True), (f"{y:02d}", False), ("\n", True)]
        else:
            segs.append((f"{head}{y:02d}\n", True))
        x = y
    if extra:
        nxt = LETTERS[rng.randrange(k)] if countdown else LETTERS[min(k, MAX_K - 1)]  # no next tag after a
        letter = rng.choice([nxt, LETTERS[rng.randrange(k)]])
        op, d = random_op(rng)
        segs.append((f"{x:02d} {letter}{op}{d}={apply_op(x, op, d):02d}\n", False))
    segs.append((f"{ANSWER_PREFIX}{x:02d}", True))
    return segs


def train_batches(seed: int, batch_size: int, k_range=TRAIN_K_RANGE, slips: tuple[float, float] = (0.0, 0.0),
                  countdown: bool = True):
    """Deterministic stream of ``[(problem, segments)] * batch_size`` lists sharing one k per batch.

    ``slips`` = ``(p_slip, p_extra)`` of :func:`slipped_solution`, drawn from a stream of their own so
    the problems are the same with or without them; ``countdown``: the shipped format (``False``: the
    first format, of the curriculum's first phases; the same random draws)."""
    rng = random.Random(f"opdkit-chain-sft-{seed}")
    slip_rng = random.Random(f"opdkit-chain-slips-{seed}")
    held_out = {_draws(p) for p in _held_out_problems()}  # compared by their draws: either format
    while True:
        k = rng.randint(*k_range)
        batch = []
        while len(batch) < batch_size:
            problem = random_problem(rng, k, countdown=countdown)
            if _draws(problem, countdown) not in held_out:
                batch.append((problem, slipped_solution(problem, slip_rng, *slips, countdown=countdown)))
        yield batch


def encode_batch(tok, batch):
    """Token ids ``[B, T]`` and labels (-100 on prompt tokens, untrained segments and right padding).

    Right padding needs no attention mask in a causal model: no real token attends to a later pad."""
    ids, labels = [], []
    for problem, segments in batch:
        p = tok(format_prompt(problem), add_special_tokens=False).input_ids
        row, lab = list(p), [-100] * len(p)
        for text, trained in segments:
            t = tok(text, add_special_tokens=False).input_ids
            row += t
            lab += t if trained else [-100] * len(t)
        row.append(tok.eos_token_id)
        lab.append(tok.eos_token_id)
        ids.append(row)
        labels.append(lab)
    width = max(map(len, ids))
    ids = [r + [tok.pad_token_id] * (width - len(r)) for r in ids]
    labels = [r + [-100] * (width - len(r)) for r in labels]
    return torch.tensor(ids), torch.tensor(labels)


def sft(model, tok, *, steps: int, lr: float, seed: int, batch_size: int = BATCH_SIZE,
        warmup: int = WARMUP, schedule: str = "cosine", desc: str = "sft", progress: bool = True,
        eval_every: int = 0, eval_fn=None, k_range=TRAIN_K_RANGE, stop_after: int | None = None,
        slips: tuple[float, float] = (0.0, 0.0), countdown: bool = True) -> dict:
    """Teacher-forced CE on response tokens. Returns ``{final_loss, losses (every 50), evals}``.

    ``stop_after``: stop early after this many steps of a ``steps``-long schedule (the student's early stop).
    ``slips``: ``(p_slip, p_extra)`` of :func:`slipped_solution` (the teacher's off-track traces);
    ``countdown``: train on the shipped format (``False``: the first format).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm gains: no decay towards 0
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    data = train_batches(seed, batch_size, k_range, slips, countdown)
    losses, evals, ema = [], [], None
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if stop_after is not None and step >= stop_after:
            break
        ids, labels = encode_batch(tok, next(data))
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.loss.item()
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if step % 50 == 0 or step == steps - 1:
            losses.append((step, round(loss, 5)))
        bar.set_postfix(loss=f"{ema:.4f}")
        if eval_every and eval_fn and (step + 1) % eval_every == 0:
            model.eval()
            evals.append({"step": step + 1, **eval_fn(model)})
            model.train()
            bar.write(f"{desc} step {step + 1}: {evals[-1]}")
    model.eval()
    return {"final_loss_ema": round(ema, 5), "losses": losses, "evals": evals}


@torch.no_grad()
def generate(model, tok, problems: list[str], *, temperature: float = 0.0, max_new_tokens: int | None = None,
             batch_size: int = 64, seed: int = 0) -> list[str]:
    """Batched sampling with the KV cache (``model.generate``); greedy when ``temperature == 0``."""
    if max_new_tokens is None:
        max_new_tokens = trace_length(len(LETTERS)) + 10
    torch.manual_seed(seed)
    old_side, tok.padding_side = tok.padding_side, "left"
    outs = []
    try:
        for i in range(0, len(problems), batch_size):
            chunk = [format_prompt(p) for p in problems[i:i + batch_size]]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            kw = dict(do_sample=True, temperature=temperature, top_k=None, top_p=None) if temperature > 0 \
                else dict(do_sample=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **kw)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return outs


def evaluate_accuracy(model, tok, rows: list[dict], temperature: float = 0.0, n: int = 1,
                      seed: int = 0, batch_size: int = 64) -> float:
    """Mean pass@1 over ``n`` samples per row (``grade_chain`` on the final answer line)."""
    k = max(len(r["problem"].split()) - 1 for r in rows)
    problems = [r["problem"] for r in rows for _ in range(n)]
    answers = [r["answer"] for r in rows for _ in range(n)]
    texts = generate(model, tok, problems, temperature=temperature, seed=seed, batch_size=batch_size,
                     max_new_tokens=trace_length(k) + 10)
    return sum(grade_chain(t, a) for t, a in zip(texts, answers)) / len(texts)


def accuracy_table(model, tok, benches: dict[str, list[dict]], *, n_sampled: int = 4, seed: int = 0) -> dict:
    """Greedy and T=1 pass@1 (``n_sampled`` samples per problem) on every benchmark."""
    table = {}
    for name, rows in benches.items():
        table[name] = {"greedy": round(evaluate_accuracy(model, tok, rows, 0.0, 1, seed), 4),
                       "t1_pass1": round(evaluate_accuracy(model, tok, rows, 1.0, n_sampled, seed), 4)}
    return table


QK_NORM_GAIN = 2.0
ROPE_THETA = 1_000_000.0


def _build(spec: TinyQwen3Spec, tok, seed: int, qk_gain: float = QK_NORM_GAIN, rope_theta: float = ROPE_THETA):
    """A fresh tiny Qwen3 (``tiny_qwen3``'s shape and init) with two changes that matter for this task's
    long-range lookups (attend from step i of the trace to op i of the prompt, by letter):

    * ``rope_theta`` = 1e6 (as in the real Qwen3 models) instead of the config default 1e4: with small
      heads, 1e4 leaves almost no rotary frequency slow enough for position-independent matching over
      a few hundred tokens;
    * q/k RMS-norm gains start at ``qk_gain``: Qwen3 normalises q and k per head, which caps attention
      logits at ``sqrt(head_dim) * g_q * g_k`` and, with gains of 1, prevents sharp attention.

    The checkpoint is a standard ``Qwen3ForCausalLM``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(qk_gain)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


class Phase(NamedTuple):
    """One ``sft`` call of the curriculum (fresh AdamW, batch 32): steps, peak lr, data seed, schedule,
    warmup steps, k range, early stop (steps run of ``steps``; None: all), task format, slips."""

    steps: int
    lr: float
    seed: int
    schedule: str
    warmup: int
    k_range: tuple[int, int]
    stop_after: int | None = None
    countdown: bool = True
    slips: tuple[float, float] = (0.0, 0.0)


# The shipped checkpoints' recipe: a curriculum, all of it in the countdown format of
# :mod:`opdkit.tasks.chain` (trained from scratch: warm-starting the first format's checkpoints on it left
# the student unable to relearn its first step, #13). Phase A trains on short chains (k in 2..8), where
# the induction-style lookup (from a trace line's letter to the operation in the prompt) emerges; phase B
# widens to the training range. Without phase A the lookup was not learned in 1,200 steps (the per-step
# NLL of the operand digit stayed at log 8). The teacher's phase B also trains on off-track traces
# (``slips``: one wrong result, or one made-up extra line, in a quarter of the traces each, never a
# training target), so it stays right on the student's own off-track prefixes, where OPD asks it.
TEACHER_PHASES = (Phase(800, 1e-3, 0, "constant", 50, (2, 8)),
                  Phase(600, 1e-3, 5, "cosine", 20, (4, 24), slips=(0.25, 0.25)))
# The student has the teacher's shape (4 x 128) and its phases without the slips, from another model seed,
# and is stopped early in phase B (after 250 of its 600 steps, chosen on dev seeds among snapshots): capable
# (the teacher's capacity; the lookup and the stop are learned in phase A) but under-trained on long chains.
# On dev seeds OPD raised the step-250 snapshot's strict pass@8 by 11.6 points, the step-200 one's by 3.5.
# Narrower or shallower students (4 x 64, 3 x 128, 4 x 96) either never learned the lookup or were not moved
# by OPD (#13, docs/experiments/issue13/README.md).
STUDENT_PHASES = (Phase(800, 1e-3, 0, "constant", 50, (2, 8)),
                  Phase(600, 1e-3, 5, "cosine", 20, (4, 24), 250))
# model seeds, added to prepare_miniature's seed: with the bijective multipliers the teacher of model seed 0
# stayed weak on long chains (greedy 5 % on chain16, 44 % with a 1,000-step phase B); model seed 2 learned them
TEACHER_MODEL_SEED, STUDENT_MODEL_SEED = 2, 1
CURRICULUM_STUDENT_SPEC = TEACHER_SPEC


def train_curriculum(spec: TinyQwen3Spec, tok, model_seed: int, phases, *, progress: bool = True,
                     desc: str = "sft") -> tuple[object, list]:
    """Build a model and run the SFT phases in order; returns (model, per-phase logs)."""
    model = _build(spec, tok, model_seed)
    logs = []
    for i, ph in enumerate(phases):
        logs.append(sft(model, tok, steps=ph.steps, lr=ph.lr, seed=ph.seed, schedule=ph.schedule,
                        warmup=ph.warmup, k_range=ph.k_range, stop_after=ph.stop_after,
                        desc=f"{desc} phase {i + 1}", progress=progress, slips=ph.slips,
                        countdown=ph.countdown))
    return model, logs


def _save(model, tok, path: Path):
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def prepare_miniature(out_dir: str | Path, *, seed: int = 0, teacher_steps: int = TEACHER_STEPS,
                      student_steps: int = STUDENT_STEPS, threads: int = 1, progress: bool = True,
                      n_sampled: int = 4, n_train_prompts: int = 2048, eval_every: int = 0,
                      roles: tuple[str, ...] = ("teacher", "student"),
                      student_stop_after: int | None = STUDENT_PHASES[-1].stop_after) -> dict:
    """Train and save the teacher and the early-stopped student; return (and write) the report.

    Runs the curriculum of ``TEACHER_PHASES`` / ``STUDENT_PHASES`` (the recipe of the shipped checkpoints);
    ``teacher_steps`` / ``student_steps`` / ``eval_every`` are not used by it (kept for the CLI's flags).
    ``roles`` picks which of the two to build; ``student_stop_after`` replaces the student's early stop in
    its last phase (default: the shipped recipe's; None: run the phase to its end).
    """
    unknown = set(roles) - {"teacher", "student"}
    if unknown or not roles:
        raise ValueError(f"roles must be teacher and/or student, got {roles!r}")
    last = STUDENT_PHASES[-1]
    if student_stop_after is not None and not 1 <= student_stop_after <= last.steps:
        raise ValueError(f"student_stop_after must be in 1..{last.steps} or None, got {student_stop_after}")
    student_phases = (*STUDENT_PHASES[:-1], last._replace(stop_after=student_stop_after))
    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = chain_tokenizer()
    assert len(tok) == VOCAB, len(tok)
    benches = benchmarks()
    for name, rows in benches.items():
        write_jsonl(rows, out / "data" / f"{name}.jsonl")
    write_jsonl([{k: v for k, v in r.items() if k != "solution"} for r in make_train_prompts(n_train_prompts)],
                out / "data" / "train.jsonl")
    probe = {"chain12": benches["chain12"]}

    def probe_fn(m):
        return {"chain12_t1": evaluate_accuracy(m, tok, probe["chain12"], 1.0, 2, seed)}

    report = {"seed": seed, "threads": threads, "batch_size": BATCH_SIZE, "warmup": WARMUP,
              "train_k_range": list(TRAIN_K_RANGE), "benchmarks": {
                  n: {"k": BENCHMARK_KS[n], "rows": len(r), "plays": BENCHMARK_ROLE[n]} for n, r in benches.items()},
              "torch": torch.__version__, "python": platform.python_version(), "n_sampled": n_sampled}
    for role, spec, phases, mseed in (("teacher", TEACHER_SPEC, TEACHER_PHASES, seed + TEACHER_MODEL_SEED),
                                      ("student", CURRICULUM_STUDENT_SPEC, student_phases,
                                       seed + STUDENT_MODEL_SEED)):
        if role not in roles:
            continue
        t = time.time()
        model, logs = train_curriculum(spec, tok, mseed, phases, progress=progress, desc=role)
        log = {"phases": [ph._asdict() for ph in phases], "phase_logs": logs}
        steps = sum(ph.stop_after if ph.stop_after is not None else ph.steps for ph in phases)
        lr, sched = phases[-1].lr, "curriculum"
        train_s = time.time() - t
        _save(model, tok, out / role)
        t = time.time()
        acc = accuracy_table(model, tok, benches, n_sampled=n_sampled, seed=seed)
        report[role] = {"spec": asdict(spec), "params": sum(p.numel() for p in model.parameters()),
                        "steps": steps, "lr": lr, "schedule": sched, "model_seed": mseed,
                        "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - t, 1),
                        "accuracy": acc, **log}
        if progress:
            print(f"{role}: {json.dumps(acc)}", flush=True)
    report["wall_seconds"] = round(time.time() - t0, 1)
    (out / "prepare.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the CPU miniature's teacher and student checkpoints.")
    ap.add_argument("--out", required=True, help="output directory (teacher/, student/, data/, prepare.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    ap.add_argument("--student-steps", type=int, default=STUDENT_STEPS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the shipped checkpoints: 1; "
                    "another count can change the float rounding and so the weights)")
    ap.add_argument("--n-sampled", type=int, default=4, help="T=1 samples per problem in the report")
    ap.add_argument("--eval-every", type=int, default=0, help="probe chain12 T=1 pass@1 every N steps")
    ap.add_argument("--roles", default="teacher,student", help="which checkpoints to build")
    ap.add_argument("--student-stop-after", type=int, default=STUDENT_PHASES[-1].stop_after,
                    help="steps of the student's last phase (default: the shipped recipe's early stop; "
                         "0: the whole phase)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    stop = None if a.student_stop_after == 0 else a.student_stop_after
    rep = prepare_miniature(a.out, seed=a.seed, teacher_steps=a.teacher_steps, student_steps=a.student_steps,
                            threads=a.threads, progress=not a.quiet, n_sampled=a.n_sampled,
                            eval_every=a.eval_every, roles=tuple(r.strip() for r in a.roles.split(",") if r.strip()),
                            student_stop_after=stop)
    print(f"wrote {a.out} in {rep['wall_seconds']} s")


if __name__ == "__main__":
    main()
