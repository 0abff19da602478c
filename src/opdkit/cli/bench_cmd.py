"""``opdkit bench step``: time full OPD rollout steps (sample -> teacher -> update) on CPU or GPU.

Without ``--student/--teacher`` it builds the issue's CPU workload with random weights (fixed seed):
student Qwen3 (hidden 256, 4 layers, 4 heads, 2 kv heads, head_dim 64, ffn 768), teacher Qwen3
(hidden 512, 6 layers, 8 heads, 4 kv heads, head_dim 64, ffn 1536), vocab 768. Prints one JSON line
last with ``step_time_s_median``, ``sample_s``, ``teacher_s``, ``update_s``, ``generated_tokens_per_s``.
"""

from __future__ import annotations

import json
import statistics
import time


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (bench step: time OPD rollout steps)")
    bsub = p.add_subparsers(dest="bench_what", metavar="WHAT", required=True)
    s = bsub.add_parser("step", help="median time of an OPD rollout step and its split")
    s.add_argument("--student", default="", help="HF causal LM path or id (default: random Qwen3 workload)")
    s.add_argument("--teacher", default="", help="HF causal LM path or id")
    s.add_argument("--prompts-per-step", type=int, default=8)
    s.add_argument("--samples-per-prompt", type=int, default=1)
    s.add_argument("--prompt-tokens", type=int, default=20)
    s.add_argument("--new-tokens", type=int, default=128, help="exactly this many tokens per response")
    s.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    s.add_argument("--loss", default="opd")
    s.add_argument("--gate", default="none")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--microbatch-size", type=int, default=8)
    s.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--seed", type=int, default=0)


def _models(args, device):
    from opdkit.runtime.models import TinyQwen3Spec, load_model, tiny_qwen3

    if args.student and args.teacher:
        return (load_model(args.student, dtype=args.dtype, device=device),
                load_model(args.teacher, dtype=args.dtype, device=device))
    s = tiny_qwen3(TinyQwen3Spec(vocab_size=768, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                 head_dim=64, intermediate_size=768), seed=args.seed)
    t = tiny_qwen3(TinyQwen3Spec(vocab_size=768, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4,
                                 head_dim=64, intermediate_size=1536), seed=args.seed + 1)
    from opdkit.runtime.models import resolve_dtype

    return s.to(device, resolve_dtype(args.dtype)), t.to(device, resolve_dtype(args.dtype))


def run(args) -> int:
    import torch

    from opdkit.config import load_config
    from opdkit.rollout.sampler import SamplingParams, sample_rollouts
    from opdkit.rollout.teacher import score_with_teacher
    from opdkit.train.loop import build_update_spec
    from opdkit.train.update import run_update

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student, teacher = _models(args, device)
    V = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    cfg = load_config(None, [f"loss.name={args.loss}", f"gate.name={args.gate}",
                             f"train.microbatch_size={args.microbatch_size}"], need_models=False)
    spec = build_update_spec(cfg, _NoTok(), V)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            samples_per_prompt=args.samples_per_prompt)
    g = torch.Generator().manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    for i in range(args.steps + 1):
        prompts = torch.randint(3, V, (args.prompts_per_step, args.prompt_tokens), generator=g).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # EOS is suppressed anyway (min_new_tokens = max_new_tokens)
        batch = sample_rollouts(student, prompts, params, eos_token_ids=[0], pad_token_id=0, generator=gen)
        t1 = time.perf_counter()
        batch = score_with_teacher(teacher, batch, topk=cfg.loss.topk if spec.loss.needs_support else 0,
                                   vocab_limit=V)
        t2 = time.perf_counter()
        run_update(student, opt, sched, batch, spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i:  # the first step is a warm-up
            rows.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2, batch.num_tokens()))
        print(f"step {i}{' (warm-up)' if not i else ''}: {t3 - t0:.3f} s (sample {t1 - t0:.3f}, "
              f"teacher {t2 - t1:.3f}, update {t3 - t2:.3f})", flush=True)
    med = statistics.median
    res = {"step_time_s_median": med(r[0] for r in rows), "sample_s": med(r[1] for r in rows),
           "teacher_s": med(r[2] for r in rows), "update_s": med(r[3] for r in rows),
           "generated_tokens_per_s": med(r[4] / r[1] for r in rows), "steps": args.steps,
           "prompts_per_step": args.prompts_per_step, "new_tokens": args.new_tokens, "threads": args.threads,
           "device": str(device), "loss": args.loss, "gate": args.gate}
    print(json.dumps(res))
    return 0


class _NoTok:
    """Stand-in tokenizer for random-weight benchmarks (no special tokens, no newline gate)."""

    unk_token_id = None
