"""Prepared device check: the trainer's own rollout step at paper-like shapes on one GPU (issue #15).

Builds a random-initialised Qwen3-1.7B-shaped student (float32 master weights, bf16 autocast, as the
trainer runs it) and a Qwen3-4B-shaped teacher (bfloat16) from configs (no download, no network), then
runs ``--steps`` rollout steps of ``--prompts`` prompts x ``--samples`` samples x exactly
``--new-tokens`` new tokens (EOS suppressed) through ``opdkit.train.step.rollout_step``: sample ->
teacher scoring -> one update (opd loss). Prints per step the sampling tokens/s, teacher and update
times, the update MFU and the pass-0 drift, then the peak memory and one JSON line with the same.

Needs only torch, transformers and opdkit from ``src/`` (imported from this checkout)::

    python benchmarks/gpu_check.py                 # one GPU, paper-like shapes (H200 figures: README)
    python benchmarks/gpu_check.py --tiny --device cpu --new-tokens 8 --prompts 2 --samples 2
    python benchmarks/gpu_check.py --static-decode --eos-ids 150   # rows end apart: finished-row dropping

MFU counts model FLOPs only: ``6 · N · tokens`` (N = student parameters, the tied LM head included)
plus causal attention ``6 · layers · heads · head_dim · Σ_rows L²``; gradient-checkpointing recompute
is not counted. ``--peak-tflops`` is the device's dense bf16 peak (default 989, H100 / H200 SXM).
Random weights give near-flat next-token distributions: top-p 0.9 then keeps most of the vocabulary,
the worst case for the sampler's top-k prefilter (it falls back to a full sort every step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3  # noqa: E402

# Qwen3-1.7B / Qwen3-4B shapes (their config.json): tied embeddings, vocab 151,936, head_dim 128.
STUDENT = TinyQwen3Spec(vocab_size=151_936, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                        head_dim=128, intermediate_size=6144, max_position_embeddings=40_960,
                        tie_word_embeddings=True)
TEACHER = TinyQwen3Spec(vocab_size=151_936, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                        head_dim=128, intermediate_size=9728, max_position_embeddings=40_960,
                        tie_word_embeddings=True)
TINY_STUDENT = TinyQwen3Spec(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, intermediate_size=128, tie_word_embeddings=True)
TINY_TEACHER = TinyQwen3Spec(vocab_size=512, hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                             head_dim=24, intermediate_size=192, tie_word_embeddings=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (vocab 512, hidden 64/96) for a CPU smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3, help="rollout steps (the first one also warms up)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per rollout step")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="tokens per random prompt")
    ap.add_argument("--prompt-tokens-step", type=int, default=0,
                    help="step i's prompts have prompt-tokens + i * this many tokens (new attention shapes each step)")
    ap.add_argument("--new-tokens", type=int, default=2048, help="exactly this many new tokens per response "
                    "(at most this many with --eos-ids)")
    ap.add_argument("--eos-ids", type=int, default=0, help="this many token ids (1..K) end a response, so rows finish "
                    "at varied points (on random weights about vocab / K tokens each) and the sampler's finished-row "
                    "dropping runs; 0: EOS suppressed, exactly --new-tokens per row")
    ap.add_argument("--microbatch-size", type=int, default=8, help="sequences per update forward/backward")
    ap.add_argument("--max-cache-gb", type=float, default=24.0, help="rollout.max_cache_gb (KV-cache budget)")
    ap.add_argument("--no-grad-ckpt", action="store_true", help="no gradient checkpointing in the update")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device, TFLOP/s")
    ap.add_argument("--static-decode", action="store_true", help="rollout.static_decode=true (a CUDA graph per "
                    "sampling chunk on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def build_models(args, device: torch.device):
    """Student float32 (the trainer's master weights), teacher bfloat16 on GPU (float32 on CPU), both
    initialised on the device itself (no multi-GB host copies)."""
    s_spec, t_spec = (TINY_STUDENT, TINY_TEACHER) if args.tiny else (STUDENT, TEACHER)
    with torch.device(device):
        student = tiny_qwen3(s_spec, seed=args.seed, pad_token_id=0, eos_token_id=1)
        teacher = tiny_qwen3(t_spec, seed=args.seed + 1, pad_token_id=0, eos_token_id=1)
    teacher = teacher.to(torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_(False)
    if not args.no_grad_ckpt:
        student.gradient_checkpointing_enable()
    return student.train(), teacher.eval()


def update_flops(spec: TinyQwen3Spec, n_params: int, rows: int, seq_len: int) -> float:
    """Model FLOPs of one forward + backward: ``6 N T`` plus causal attention ``6 · layers · heads · D · Σ L²``."""
    return 6.0 * n_params * rows * seq_len + 6.0 * spec.num_layers * spec.num_heads * spec.head_dim * rows * seq_len**2


def _lean_verdicts():
    from opdkit.rollout.decode_steps import _LEAN_VERDICTS

    return list(_LEAN_VERDICTS.values())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    from opdkit.cli.bench_cmd import _NoTok
    from opdkit.config import load_config
    from opdkit.train.setup import trainer_from_parts
    from opdkit.train.step import StepPrompts, rollout_step

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    student, teacher = build_models(args, device)
    _sync(device)
    build_s = time.perf_counter() - t0
    V = student.config.vocab_size
    cfg = load_config(None, ["loss.name=opd", "gate.name=none", "rollout.reward=none",
                             f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
                             f"rollout.max_new_tokens={args.new_tokens}",
                             f"rollout.min_new_tokens={0 if args.eos_ids else args.new_tokens}",
                             f"rollout.max_cache_gb={args.max_cache_gb}", "train.rollout_passes=1",
                             "train.minibatches_per_pass=1", "optim.lr=1e-6", "optim.warmup_updates=0",
                             "optim.schedule=constant", f"train.seed={args.seed}",
                             f"train.microbatch_size={args.microbatch_size}",
                             f"rollout.static_decode={str(args.static_decode).lower()}"], need_models=False)
    eos_ids = list(range(1, 1 + args.eos_ids)) if args.eos_ids else [1]
    t = trainer_from_parts(cfg, student, teacher, _NoTok(), vocab=V, eos_ids=eos_ids, pad_id=0)
    n_params = sum(p.numel() for p in student.parameters())
    rows, spec = args.prompts * args.samples, TINY_STUDENT if args.tiny else STUDENT
    g = torch.Generator().manual_seed(args.seed)
    steps = []
    for i in range(args.steps):
        P = args.prompt_tokens + i * args.prompt_tokens_step
        prompts = torch.randint(3, V, (args.prompts, P), generator=g).tolist()
        updates = []
        _sync(device)
        rec = rollout_step(t, i, StepPrompts(prompts), on_update=updates.append)
        _sync(device)
        # model FLOPs of the tokens sampled (with --eos-ids: at the mean response length, padding not counted)
        flops = update_flops(spec, n_params, rows, P + rec["response_len"])
        s, te, u = rec["time/sample"], rec["time/teacher"], rec["time/update"]
        row = {"step": i, "prompt_tokens": P, "sample_s": s, "teacher_s": te, "update_s": u,
               "sample_tokens_per_s": rec["generated_tokens"] / s, "generated_tokens": rec["generated_tokens"],
               "update_mfu": flops / u / (args.peak_tflops * 1e12) if device.type == "cuda" else None,
               "pass0_drift": float(updates[0]["drift_abs_mean"]), "loss": float(rec["loss"]),
               "response_len_mean": rec["response_len"], "stop_eos": rec["stop_eos"]}
        steps.append(row)
        mfu = "n/a" if row["update_mfu"] is None else f"{row['update_mfu']:.1%}"
        print(f"step {i}: sample {s:.2f} s ({row['sample_tokens_per_s']:,.0f} tokens/s), teacher {te:.2f} s, "
              f"update {u:.2f} s (MFU {mfu}), pass-0 drift {row['pass0_drift']:.3g}", flush=True)
    timed = steps[1:] or steps  # the first step also pays one-time costs (sampling copy, lean check, kernels)
    med = statistics.median
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "tiny": args.tiny, "student_params": n_params,
           "teacher_params": sum(p.numel() for p in teacher.parameters()),
           "rows": rows, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "build_s": build_s,
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
           "sample_tokens_per_s": med(r["sample_tokens_per_s"] for r in timed),
           "sample_s": med(r["sample_s"] for r in timed), "teacher_s": med(r["teacher_s"] for r in timed),
           "update_s": med(r["update_s"] for r in timed),
           "update_mfu": med(r["update_mfu"] for r in timed) if device.type == "cuda" else None,
           "pass0_drift_max": max(r["pass0_drift"] for r in steps),
           "static_decode": args.static_decode, "prompt_tokens_step": args.prompt_tokens_step,
           "eos_ids": args.eos_ids,
           # the hand-written decode steps' checks against the model's own forward: "dtype[ StaticStep]"
           "lean_step_checks": [{" ".join(map(str, k[:1] + k[2:])): ok for k, ok in v.items()}
                                for v in _lean_verdicts()],
           "steps": steps}
    if res["peak_mem_gb"] is not None:
        print(f"peak memory {res['peak_mem_gb']:.1f} GB (torch.cuda.max_memory_allocated)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    run(parse_args())
