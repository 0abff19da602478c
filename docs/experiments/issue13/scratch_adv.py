"""Per-field OPD advantage A = log q - log pi_old on student rollouts (chain12@7): which tokens does the teacher push?"""
import sys, statistics, torch, collections
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.chain import make_benchmark, solve
torch.set_num_threads(1)
sd, td = sys.argv[1], sys.argv[2]
tok = load_tokenizer(sd)
student = load_model(sd, dtype="float32", device="cpu").eval(); teacher = load_model(td, dtype="float32", device="cpu").eval()
rows = make_benchmark(12, 16, seed=7)
prompts = [tok(r["problem"] + "\n", add_special_tokens=False)["input_ids"] for r in rows]
batch = sample_rollouts(student, prompts, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=300, samples_per_prompt=4),
                        eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
batch = score_with_teacher(teacher, batch, topk=1)
FIELDS = ["s1", "s2", "sp", "tag", "op", "dig", "eq", "r1", "r2", "nl"]
g = collections.defaultdict(list)
for i in range(batch.size):
    ref = solve(rows[i // 4]["problem"])
    ids = batch.response_ids_BT[i][batch.response_mask_BT[i].bool()].tolist()
    chars = [tok.decode([t]) for t in ids]
    text = "".join(chars)
    for t, ch in enumerate(chars):
        line, col = divmod(t, 10)
        if t >= len(ref) or text[:t] != ref[:t]:
            key = "offtrack"
        else:
            key = "ontrack"
        f = FIELDS[col] if ref[line*10:line*10+7].strip()[:1].isdigit() and line*10 < len(ref) - 10 else "ans"
        right = t < len(ref) and ch == ref[t]
        adv = float(batch.teacher_logp_BT[i, t] - batch.logp_old_BT[i, t])
        g[(key, f, "right" if right else "wrong")].append(adv)
for k in sorted(g):
    xs = g[k]
    print(k, len(xs), f"{statistics.mean(xs):+.3f}")
