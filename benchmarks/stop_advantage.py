"""The OPD advantage at the miniature's stop decisions (why OPD flips the student from stopping early to
running long; README, "The CPU miniature").

Samples ``--samples`` rollouts per problem of ``chain{--k}`` from a student, scores them with the teacher
and reports the sampled-token OPD advantage ``A_t = log q − log π_old`` (docs/methods.md §2.1) at every line
start, split by what the student did there: wrote ``answer`` before step k, went on at step k, wrote
``answer`` at step k, wrote ``answer`` after running past step k.

    python benchmarks/stop_advantage.py                       # shipped student and teacher, chain12
    python benchmarks/stop_advantage.py --student runs/demo3/runs/opd-seed0/final
"""

from __future__ import annotations

import argparse
import statistics

import torch

from opdkit.demo.runner import shipped_models
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.chain import make_benchmark, parse_problem


def main() -> None:
    student_dir, teacher_dir = shipped_models()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default=str(student_dir))
    ap.add_argument("--teacher", default=str(teacher_dir))
    ap.add_argument("--k", type=int, default=12, help="chain length of the benchmark")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4, help="rollouts per problem")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(a.student)
    student = load_model(a.student, dtype="float32", device="cpu").eval()
    teacher = load_model(a.teacher, dtype="float32", device="cpu").eval()
    rows = make_benchmark(a.k)[:a.problems]
    prompts = [tok(r["problem"] + "\n", add_special_tokens=False)["input_ids"] for r in rows]
    batch = sample_rollouts(student, prompts, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=300,
                                                             samples_per_prompt=a.samples),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(a.seed))
    batch = score_with_teacher(teacher, batch, topk=1)
    groups: dict[str, list[float]] = {"answer before step k": [], "went on at step k": [],
                                      "answer at step k": [], "answer after step k": []}
    for i in range(batch.size):
        k = len(parse_problem(rows[i // a.samples]["problem"])[1])
        ids = batch.response_ids_BT[i][batch.response_mask_BT[i].bool()].tolist()
        chars = [tok.decode([t]) for t in ids]
        line = 0
        for t, ch in enumerate(chars):
            if t and chars[t - 1] != "\n":
                continue
            adv = float(batch.teacher_logp_BT[i, t] - batch.logp_old_BT[i, t])
            if ch == "a":
                key = "answer before step k" if line < k else ("answer at step k" if line == k else
                                                              "answer after step k")
                groups[key].append(adv)
            elif line == k:
                groups["went on at step k"].append(adv)
            line += 1
    print(f"{a.student} on chain{a.k}: {batch.size} rollouts; OPD advantage at line starts")
    for key, xs in groups.items():
        print(f"  {key:22s} n = {len(xs):4d}  mean A = {statistics.mean(xs):+.2f}" if xs else f"  {key:22s} n = 0")


if __name__ == "__main__":
    main()
