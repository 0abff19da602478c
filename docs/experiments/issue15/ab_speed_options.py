"""In-process A/B of two speed options on the bench workload (README, "The CPU step, sixth stop").

Two trainers on identical random models (opdkit bench step's shapes), static decode and bf16 autocast, one
with transformers' SDPA attention and torch's default AdamW, the other with eager attention and fused
AdamW; their rollout steps alternate (the order flips every step) on the same prompts, so a slow stretch of
the machine hits both. Prints the median split of each over N - 1 steps (the first is a warm-up).

    PYTHONPATH=src N=14 python docs/experiments/issue15/ab_speed_options.py
"""

import argparse
import os
import statistics

import torch

from opdkit.cli import bench_cmd
from opdkit.config import load_config
from opdkit.train.setup import trainer_from_parts
from opdkit.train.step import StepPrompts, rollout_step

torch.set_num_threads(2)


def make(attn: str, adamw: str):
    args = argparse.Namespace(student="", teacher="", dtype="float32", teacher_dtype="bfloat16", seed=0,
                              attn_implementation=attn)
    student, teacher = bench_cmd._models(args, torch.device("cpu"))
    cfg = load_config(None, [
        "loss.name=opd", "gate.name=none", "rollout.reward=none", "rollout.prompts_per_step=8",
        "rollout.samples_per_prompt=1", "rollout.max_new_tokens=128", "rollout.min_new_tokens=128",
        "train.rollout_passes=1", "train.minibatches_per_pass=1", "optim.lr=1e-6", "optim.warmup_updates=0",
        "optim.schedule=constant", "train.seed=0", "train.microbatch_size=8", "train.autocast=bf16",
        "rollout.static_decode=true", f"optim.adamw={adamw}", f"model.attn_implementation={attn}"],
        need_models=False)
    return trainer_from_parts(cfg, student, teacher, bench_cmd._NoTok(), vocab=768, eos_ids=[0], pad_id=0)


def main() -> None:
    trainers = {"sdpa + torch_default AdamW": make("sdpa", "torch_default"),
                "eager + fused AdamW": make("eager", "fused")}
    g = torch.Generator().manual_seed(0)
    res: dict[str, list] = {}
    for i in range(int(os.environ.get("N", "14"))):
        prompts = torch.randint(3, 768, (8, 20), generator=g).tolist()
        for name in (list(trainers) if i % 2 == 0 else list(trainers)[::-1]):
            rec = rollout_step(trainers[name], i, StepPrompts(prompts))
            if i:
                res.setdefault(name, []).append((rec["time/sample"], rec["time/teacher"], rec["time/update"]))
    for name, rows in res.items():
        med = [statistics.median(r[j] for r in rows) for j in range(3)]
        print(f"{name}: sample {med[0]:.3f} s, teacher {med[1]:.3f} s, update {med[2]:.3f} s, "
              f"step (median of sums) {statistics.median(sum(r) for r in rows):.3f} s")


if __name__ == "__main__":
    main()
