"""Why LSM students stop early more often (README, "Three seeds"). Per student, on its own samples: how its
traces end, and at two decisions whether the token it chose lies inside the teacher's top-K support (the only
tokens LSM's loss reads, renormalised: a token outside gets no gradient from the loss at that position):

- line starts before step k: ``a`` (of ``answer:``) stops, a digit goes on;
- the tag of a line before the last step (``42 b*3=26``: the 4th character): ``a`` there picks the last
  operation too soon, after which stopping is what the teacher says too; and any tag other than the
  teacher's first choice (a skipped or repeated operation).

Dev problems only (chainK@7, k = 12 and 16, 32 problems x 4 samples each; never a held-out benchmark), the
demo's sampling (T = 1, top-p 0.9) and K = 8.

    PYTHONPATH=src python docs/experiments/issue13/lsm_support.py TEACHER_DIR STUDENT_DIR [STUDENT_DIR ...]
"""

import statistics
import sys

import torch

from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.chain import make_benchmark, trace_errors

torch.set_num_threads(2)
K = 8


def decisions(student, teacher, tok, a_id):
    """(trace kinds, {decision: [(chose a, a in teacher top-K, teacher q(a))]}) over the dev samples."""
    kinds, out = [], {"line start": [], "tag": [], "tag slip": []}
    for k in (12, 16):
        rows = make_benchmark(k, 32, seed=7)
        prompts = [tok(r["problem"] + "\n", add_special_tokens=False)["input_ids"] for r in rows]
        b = sample_rollouts(student, prompts, SamplingParams(top_p=0.9, max_new_tokens=300, samples_per_prompt=4),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
        b = score_with_teacher(teacher, b, topk=K)
        for i in range(b.size):
            resp = b.response_ids_BT[i, : int(b.response_mask_BT[i].sum())].tolist()
            kinds.append(trace_errors(rows[i // 4]["problem"], tok.decode(resp))["kind"])
            starts = [0] + [t + 1 for t, c in enumerate(resp[:-1]) if tok.decode([c]) == "\n"]
            for line, t in enumerate(starts[:k]):
                for name, pos in (("line start", t), ("tag", t + 3)):
                    if name == "tag" and (line >= k - 1 or pos >= len(resp) or resp[t] == a_id):
                        continue
                    S, top = b.teacher_topk_ids_BTK[i, pos], b.teacher_topk_logits_BTK[i, pos]
                    q_a = float((top - top.logsumexp(0))[S == a_id].exp().sum()) if (S == a_id).any() else 0.0
                    out[name].append((resp[pos] == a_id, bool((S == a_id).any()), q_a))
                    if name == "tag":  # the tag against the teacher's first choice: a skipped or repeated tag
                        chosen = S == resp[pos]
                        out["tag slip"].append((resp[pos] != int(S[0]), bool(chosen.any()),
                                                float((top - top.logsumexp(0))[chosen].exp().sum())))
    return kinds, out


teacher_dir, students = sys.argv[1], sys.argv[2:]
teacher = load_model(teacher_dir, dtype="float32", device="cpu").eval()
for sd in students:
    tok = load_tokenizer(sd)
    a_id = tok("a", add_special_tokens=False)["input_ids"][0]
    kinds, out = decisions(load_model(sd, dtype="float32", device="cpu").eval(), teacher, tok, a_id)
    print(f"{sd}: short {kinds.count('short') / len(kinds):.1%}, exact {kinds.count('exact') / len(kinds):.1%}, "
          f"long {kinds.count('long') / len(kinds):.1%} of {len(kinds)} samples")
    for name, recs in out.items():
        chose = [r for r in recs if r[0]]
        if name == "tag slip":
            print(f"  tag other than the teacher's first choice at {len(chose)} of {len(recs)} lines "
                  f"({len(chose) / max(1, len(recs)):.1%}); there the chosen tag was in the teacher's top-{K} "
                  f"{sum(r[1] for r in chose) / max(1, len(chose)):.0%}, teacher q of it (top-{K} renormalised) "
                  f"median {statistics.median(r[2] for r in chose) if chose else float('nan'):.3g}")
            continue
        if not chose:
            print(f"  {name}: 'a' chosen at 0 of {len(recs)}")
            continue
        print(f"  {name}: 'a' chosen at {len(chose)} of {len(recs)} ({len(chose) / len(recs):.1%}); there 'a' was in "
              f"the teacher's top-{K} {sum(r[1] for r in chose) / len(chose):.0%}, teacher q(a) (top-{K} renormalised) "
              f"median {statistics.median(r[2] for r in chose):.3g}")
