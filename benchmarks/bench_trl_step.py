"""Time TRL's on-policy distillation step on the workload of ``opdkit bench step`` (issue #15, item 5).

Runs in its own environment with TRL installed (TRL is not an opdkit dependency)::

    python -m venv trl-env && trl-env/bin/pip install torch==2.13.0   # the CPU build
    trl-env/bin/pip install trl -c <(echo torch==2.13.0)               # measured: trl 1.16.0, transformers 5.25.0
    trl-env/bin/python benchmarks/bench_trl_step.py --trainer distillation   # trl.DistillationTrainer
    trl-env/bin/python benchmarks/bench_trl_step.py --trainer gkd            # trl.experimental.gkd.GKDTrainer

The workload is ``opdkit bench step``'s: random Qwen3 student (hidden 256, 4 layers, 4 heads, 2 kv
heads, head_dim 64, ffn 768), random Qwen3 teacher (hidden 512, 6 layers, 8 heads, 4 kv heads, head_dim
64, ffn 1536), vocab 768, 8 prompts of 20 tokens x 1 sample, exactly 128 new tokens (``min_new_tokens``),
one optimizer update per step, ``--threads`` torch threads. Both trainers run fully on-policy (GKD:
``lmbda=1``) with reverse KL (``beta=1``), no gradient checkpointing, in float32 (``--bf16``: TRL's
default bf16 autocast). A step is timed from the Trainer's ``on_step_begin`` to ``on_step_end``
(generation, teacher forward, loss, backward, optimizer); the first step is a warm-up. Prints one JSON
line last with ``step_time_s_median`` and ``generate_s_median`` (the student's ``generate`` calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

V = 768


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")
    # GKD's ChatML collator renders conversations: the plainest template that keeps the prompt's 20 tokens
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return fast


def _models(seed: int, attn: str = "sdpa"):
    """The shapes of ``opdkit.cli.bench_cmd._models`` (written out here: this script runs without opdkit)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def build(hidden, layers, heads, kv, ffn, s):
        torch.manual_seed(s)
        cfg = Qwen3Config(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, head_dim=64, intermediate_size=ffn, max_position_embeddings=512,
                          tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
        model = Qwen3ForCausalLM(cfg).float()
        model.set_attn_implementation(attn)
        return model

    return build(256, 4, 4, 2, 768, seed), build(512, 6, 8, 4, 1536, seed + 1)


class _StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.t0, outer._gen = time.perf_counter(), 0.0

            def on_step_end(self, args, state, control, **kw):
                outer.times.append(time.perf_counter() - outer.t0)
                outer.gen_times.append(outer._gen)
                outer._gen = 0.0

        self.times: list[float] = []
        self.gen_times: list[float] = []
        self._gen = 0.0
        self.callback = CB()

    def wrap_generate(self, model) -> None:
        """Time the student's ``generate`` calls (the sampling part of a step)."""
        inner = model.generate

        def generate(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self._gen += time.perf_counter() - t0

        model.generate = generate


def _common(args) -> dict:
    return dict(output_dir=args.out, per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
                max_steps=args.steps + 1, learning_rate=1e-6, lr_scheduler_type="constant", bf16=args.bf16,
                gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                logging_steps=10_000, dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, beta=1.0,
                temperature=1.0)


def _prompts(args) -> list[str]:
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(3, V, (args.prompts * (args.steps + 2), args.prompt_tokens), generator=g).tolist()
    return [" ".join(f"t{i}" for i in r) for r in rows]


def _distillation(args, student, teacher, tok, timer):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    cfg = DistillationConfig(**_common(args), max_completion_length=args.new_tokens, top_p=1.0,
                             generation_kwargs={"min_new_tokens": args.new_tokens}, shuffle_dataset=False)
    ds = Dataset.from_dict({"prompt": _prompts(args)})
    return DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds,
                               processing_class=tok, callbacks=[timer.callback])


def _gkd(args, student, teacher, tok, timer):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = GKDConfig(**_common(args), lmbda=1.0, max_new_tokens=args.new_tokens, max_length=args.prompt_tokens + 8)
    # the ChatML collator needs a completion turn; on-policy generation (lmbda=1) replaces it every step
    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": "t3"}]
                                         for p in _prompts(args)]})
    t = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                   callbacks=[timer.callback])
    t.generation_config.min_new_tokens = args.new_tokens
    return t


TRAINERS = {"distillation": _distillation, "gkd": _gkd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainer", choices=sorted(TRAINERS), default="distillation")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (1 sample each)")
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (TRL's default; off: float32 like opdkit's workload)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention implementation of both models (transformers' default: sdpa)")
    p.add_argument("--out", default="/tmp/opdkit-bench-trl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    student, teacher = _models(args.seed, args.attn)
    timer = _StepTimer()
    timer.wrap_generate(student)
    trainer = TRAINERS[args.trainer](args, student, teacher, _tokenizer(), timer)
    trainer.train()
    timed, gen = timer.times[1:], timer.gen_times[1:]
    import transformers
    import trl

    print(json.dumps({"trainer": args.trainer, "trl": trl.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "threads": args.threads, "bf16": args.bf16, "attn": args.attn,
                      "steps": len(timed),
                      "step_time_s_median": round(statistics.median(timed), 4),
                      "generate_s_median": round(statistics.median(gen), 4),
                      "step_times_s": [round(x, 4) for x in timed]}))


if __name__ == "__main__":
    main()
