"""Reverse KL to the teacher on fixed prompts, before and after training (#13, criterion 2).

The demo's "sampled reverse KL" is read on each rollout step's own prompts, whose horizon k is drawn anew
every step, so its first-vs-last comparison mixes training with the prompts drawn. This script holds the
prompts fixed: dev problems (chainK@7, never a held-out benchmark), 32 per k in 8 / 12 / 16 / 24, 4 samples
each from the student at T = 1 (no top-p: the student's own distribution), the same sampling seed for every
student. Per response token it reads both models' full next-token distributions and reports

    exact reverse KL   KL_t = sum_v p_s(v | c_t) (log p_s(v | c_t) - log p_t(v | c_t))
    sampled estimate   log p_s(y_t | c_t) - log p_t(y_t | c_t)      (what OPD's advantage is built from)

averaged over the response tokens of each k, then over the four k (nats/token).

    PYTHONPATH=src python docs/experiments/issue13/fixed_kl.py TEACHER_DIR STUDENT_DIR [STUDENT_DIR ...]
"""

import sys

import torch

from opdkit.losses.divergences import reverse_kl
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.scoring import decoder_and_head, response_hidden_states
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.chain import format_prompt, make_benchmark

torch.set_num_threads(1)
KS, N_PROBLEMS, N_SAMPLES = (8, 12, 16, 24), 32, 4


def logits_BTV(model, batch):
    _, weight_VH = decoder_and_head(model)
    return response_hidden_states(model, batch).float() @ weight_VH.float().T


@torch.no_grad()
def kl_per_k(student, teacher, tok):
    out = {}
    for k in KS:
        rows = make_benchmark(k, N_PROBLEMS, seed=7)
        prompts = [tok(format_prompt(r["problem"]), add_special_tokens=False)["input_ids"] for r in rows]
        b = sample_rollouts(student, prompts, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=300,
                                                             samples_per_prompt=N_SAMPLES),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(k))
        zs_BTV, zt_BTV = logits_BTV(student, b), logits_BTV(teacher, b)
        mask_BT = b.response_mask_BT.float()
        exact_BT = reverse_kl(zs_BTV, zt_BTV, mask_BT)  # opdkit's per-token KL(p_s || p_t), zero off the mask
        ls_BTV, lt_BTV = zs_BTV.log_softmax(-1), zt_BTV.log_softmax(-1)
        ids_BT1 = b.response_ids_BT.unsqueeze(-1)
        sampled_BT = (ls_BTV.gather(-1, ids_BT1) - lt_BTV.gather(-1, ids_BT1)).squeeze(-1)
        n = mask_BT.sum()
        out[k] = (float((exact_BT * mask_BT).sum() / n), float((sampled_BT * mask_BT).sum() / n))
    return out


teacher_dir, students = sys.argv[1], sys.argv[2:]
tok = load_tokenizer(teacher_dir)
teacher = load_model(teacher_dir, dtype="float32", device="cpu").eval()
for sd in students:
    student = load_model(sd, dtype="float32", device="cpu").eval()
    res = kl_per_k(student, teacher, tok)
    exact = sum(e for e, _ in res.values()) / len(res)
    sampled = sum(s for _, s in res.values()) / len(res)
    cells = " | ".join(f"k={k} {e:.3f} / {s:.3f}" for k, (e, s) in res.items())
    print(f"{sd}: exact / sampled reverse KL, mean over k {exact:.4f} / {sampled:.4f}  ({cells})", flush=True)
