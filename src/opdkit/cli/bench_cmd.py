"""``opdkit bench step``: time full OPD rollout steps (sample -> teacher -> update) on CPU or GPU.

Without ``--student/--teacher`` it builds the issue's CPU workload with random weights (fixed seed):
student Qwen3 (hidden 256, 4 layers, 4 heads, 2 kv heads, head_dim 64, ffn 768), teacher Qwen3
(hidden 512, 6 layers, 8 heads, 4 kv heads, head_dim 64, ffn 1536), vocab 768. Prints one JSON line
last with ``step_time_s_median``, ``sample_s``, ``teacher_s``, ``update_s``, ``generated_tokens_per_s``.
"""

from __future__ import annotations

import json
import statistics

from opdkit.runtime.models import ATTN_CHOICES


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
    s.add_argument("--dtype", default="float32", help="student (and default teacher) weights dtype")
    s.add_argument("--teacher-dtype", default="", help="teacher weights dtype (default: --dtype); a frozen "
                   "teacher in bfloat16 still gives float32 log-probs (float32 LM head on bf16 hidden states)")
    s.add_argument("--autocast", default="auto", help="train.autocast: auto (bf16 on CUDA only), bf16 (also on CPU: "
                   "float32 master weights, bf16 forwards and sampling copy), off")
    s.add_argument("--static-decode", action="store_true", help="rollout.static_decode=true: the static-shape "
                   "decode step, compiled once (CPU) or a CUDA graph (CUDA); the warm-up step pays the compile")
    s.add_argument("--attn-implementation", default="sdpa", choices=ATTN_CHOICES,
                   help="model.attn_implementation of both models: sdpa (transformers' default) or eager (on CPU "
                   "faster for these short rows)")
    s.add_argument("--adamw", default="auto", help="optim.adamw: auto (fused on CUDA only), fused (also on CPU), "
                   "torch_default")
    s.add_argument("--seed", type=int, default=0)


def _teacher_dtype(args) -> str:
    return args.teacher_dtype or args.dtype


def _models(args, device):
    from opdkit.runtime.models import TinyQwen3Spec, load_model, tiny_qwen3

    attn = getattr(args, "attn_implementation", "sdpa")
    if args.student and args.teacher:
        return (load_model(args.student, dtype=args.dtype, device=device, attn_implementation=attn),
                load_model(args.teacher, dtype=_teacher_dtype(args), device=device, attn_implementation=attn))
    s = tiny_qwen3(TinyQwen3Spec(vocab_size=768, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                 head_dim=64, intermediate_size=768), seed=args.seed)
    t = tiny_qwen3(TinyQwen3Spec(vocab_size=768, hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4,
                                 head_dim=64, intermediate_size=1536), seed=args.seed + 1)
    from opdkit.runtime.models import resolve_dtype

    s.set_attn_implementation(attn)
    t.set_attn_implementation(attn)
    return s.to(device, resolve_dtype(args.dtype)), t.to(device, resolve_dtype(_teacher_dtype(args)))


def run(args) -> int:
    import torch

    from opdkit.config import load_config
    from opdkit.train.setup import trainer_from_parts
    from opdkit.train.step import StepPrompts, rollout_step

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student, teacher = _models(args, device)
    V = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    # The trainer's own step (opdkit.train.step), on random prompts; EOS is suppressed anyway
    # (min_new_tokens = max_new_tokens), so every response has exactly --new-tokens tokens.
    cfg = load_config(None, [f"loss.name={args.loss}", f"gate.name={args.gate}", "rollout.reward=none",
                             f"rollout.prompts_per_step={args.prompts_per_step}",
                             f"rollout.samples_per_prompt={args.samples_per_prompt}",
                             f"rollout.max_new_tokens={args.new_tokens}", f"rollout.min_new_tokens={args.new_tokens}",
                             "train.rollout_passes=1", "train.minibatches_per_pass=1", "optim.lr=1e-6",
                             "optim.warmup_updates=0", "optim.schedule=constant", f"train.seed={args.seed}",
                             f"train.microbatch_size={args.microbatch_size}",
                             f"rollout.static_decode={str(args.static_decode).lower()}",
                             f"train.autocast={args.autocast}", f"optim.adamw={args.adamw}",
                             f"model.attn_implementation={args.attn_implementation}"], need_models=False)
    t = trainer_from_parts(cfg, student, teacher, _NoTok(), vocab=V, eos_ids=[0], pad_id=0)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for i in range(args.steps + 1):
        prompts = torch.randint(3, V, (args.prompts_per_step, args.prompt_tokens), generator=g).tolist()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rec = rollout_step(t, i, StepPrompts(prompts))
        if device.type == "cuda":
            torch.cuda.synchronize()
        s, te, u = rec["time/sample"], rec["time/teacher"], rec["time/update"]
        if not i:
            warmup_s = s + te + u
        else:  # the first step is a warm-up (and pays a compile)
            rows.append((s + te + u, s, te, u, rec["generated_tokens"]))
        print(f"step {i}{' (warm-up)' if not i else ''}: {s + te + u:.3f} s (sample {s:.3f}, "
              f"teacher {te:.3f}, update {u:.3f})", flush=True)
    med = statistics.median
    res = {"step_time_s_median": med(r[0] for r in rows), "sample_s": med(r[1] for r in rows),
           "teacher_s": med(r[2] for r in rows), "update_s": med(r[3] for r in rows),
           "generated_tokens_per_s": med(r[4] / r[1] for r in rows), "steps": args.steps,
           "prompts_per_step": args.prompts_per_step, "new_tokens": args.new_tokens, "threads": args.threads,
           "device": str(device), "loss": args.loss, "gate": args.gate, "dtype": args.dtype,
           "teacher_dtype": _teacher_dtype(args),
           "static_decode": args.static_decode, "autocast": args.autocast,
           "attn_implementation": args.attn_implementation, "adamw": args.adamw, "warmup_step_s": warmup_s}
    print(json.dumps(res))
    return 0


class _NoTok:
    """Stand-in tokenizer for random-weight benchmarks (no special tokens, no newline gate, no rewards)."""

    unk_token_id = None
    pad_token_id = 0
