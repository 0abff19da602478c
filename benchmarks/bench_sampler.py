"""Sampler speed: opdkit's decode loop vs ``model.generate`` on a small random Qwen3 (CPU or CUDA).

Workload (fixed so numbers compare across runs): random Qwen3 student (hidden 256, 4 layers, 4 heads,
2 kv heads, head_dim 64, ffn 768), vocab 768, 8 prompts of 16–23 tokens × 1 sample, exactly 128 new
tokens (min_new_tokens = max_new_tokens = 128), temperature 1, top-p 0.9, float32.

    python benchmarks/bench_sampler.py [--threads 2] [--reps 5] [--device cpu|cuda]

Each variant runs once to warm up, then ``--reps`` times; the table shows the best and the median
wall time (CPU timings on a shared machine are noisy: compare the best). Variants: ``model.generate``;
opdkit's loop with its lean decode step (the default for Qwen3 / Qwen2 / Llama); the same loop calling the
model's own forward with each KV cache. Also checks that the loop's behaviour log-probs equal a
recomputation with ``response_logprobs``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from opdkit.rollout import decode_steps
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.scoring import response_logprobs
from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3

SPEC = TinyQwen3Spec(vocab_size=768, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                     intermediate_size=768)
N_PROMPTS, NEW_TOKENS, EOS, PAD = 8, 128, 2, 0


def _prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(16, 24, (N_PROMPTS,), generator=g).tolist()
    return [torch.randint(3, SPEC.vocab_size, (n,), generator=g).tolist() for n in lens]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int, device: torch.device) -> list[float]:
    fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = tiny_qwen3(SPEC, seed=0).to(device)
    prompts = _prompts()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    P = max(len(p) for p in prompts)
    ids = torch.full((N_PROMPTS, P), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)

    def hf_generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.9,
                                 top_k=0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 output_logits=True, return_dict_in_generate=True, eos_token_id=EOS,
                                 pad_token_id=PAD)
        assert out.sequences.shape[1] == P + NEW_TOKENS

    def ours(kv_cache, lean=True):
        def run():
            saved = decode_steps.LEAN_MODEL_TYPES
            decode_steps.LEAN_MODEL_TYPES = saved if lean else ()
            try:
                b = sample_rollouts(model, prompts, params, eos_token_ids=[EOS], pad_token_id=PAD,
                                    generator=torch.Generator().manual_seed(1), kv_cache=kv_cache)
            finally:
                decode_steps.LEAN_MODEL_TYPES = saved
            assert b.response_ids_BT.shape[1] == NEW_TOKENS
        return run

    variants = [("model.generate (DynamicCache)", hf_generate),
                ("opdkit: lean step, prealloc KV", ours("preallocated")),
                ("opdkit: HF forward, prealloc KV", ours("preallocated", lean=False)),
                ("opdkit: HF forward, DynamicCache", ours("dynamic")),
                ("opdkit: HF forward, StaticCache", ours("static"))]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={device} threads={args.threads} reps={args.reps} load(1min)={load:.2f} "
          f"workload: {N_PROMPTS} prompts x {NEW_TOKENS} new tokens, vocab {SPEC.vocab_size}, fp32")
    print(f"{'variant':32s} {'best s':>8s} {'median s':>9s} {'ms/step':>8s} {'tokens/s':>9s}")
    for name, fn in variants:
        ts = _time(fn, args.reps, device)
        best = min(ts)
        print(f"{name:32s} {best:8.3f} {statistics.median(ts):9.3f} {best / NEW_TOKENS * 1e3:8.2f} "
              f"{N_PROMPTS * NEW_TOKENS / best:9.0f}")

    b = sample_rollouts(model, prompts, params, eos_token_ids=[EOS], pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = response_logprobs(model, b).logp_BT
    err = ((lp - b.logp_old_BT).abs() * b.response_mask_BT).max().item()
    print(f"max |logp_old - response_logprobs| = {err:.2e}")


if __name__ == "__main__":
    main()
