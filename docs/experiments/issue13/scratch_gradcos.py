"""Is the sampled-token OPD gradient a descent direction of the full-vocabulary reverse KL on the student's own
rollouts? cos(g_opd, g_kl) on one batch, and the KL after a small step along each (same batch / fresh batch)."""
import sys, torch
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.tasks.chain import make_benchmark
torch.set_num_threads(1)
sd, td = sys.argv[1], sys.argv[2]
tok = load_tokenizer(sd)
S = load_model(sd, dtype="float32", device="cpu"); T = load_model(td, dtype="float32", device="cpu").eval()

def batch(seed, k=12, n=32, top_p=1.0):
    rows = make_benchmark(k, n, seed=seed)
    prompts = [tok(r["problem"] + "\n", add_special_tokens=False)["input_ids"] for r in rows]
    S.eval()
    b = sample_rollouts(S, prompts, SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=300, samples_per_prompt=4),
                        eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                        generator=torch.Generator().manual_seed(seed))
    seqs = []
    for i in range(b.size):
        p = prompts[i // 4]
        r = b.response_ids_BT[i][b.response_mask_BT[i].bool()].tolist()
        seqs.append((p, r))
    return seqs

def logits_of(model, seqs):
    out = []
    for p, r in seqs:
        ids = torch.tensor([p + r])
        lg = model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(r) - 1].float()
        out.append((lg, torch.tensor(r)))
    return out

def losses(seqs):
    with torch.no_grad():
        tq = [lg.log_softmax(-1) for lg, _ in logits_of(T, seqs)]
    sl = logits_of(S, seqs)
    n = sum(len(r) for _, r in seqs)
    opd, kl = 0.0, 0.0
    for (lg, r), lq in zip(sl, tq):
        lp = lg.log_softmax(-1)
        lpx = lp.gather(-1, r[:, None])[:, 0]
        A = (lq.gather(-1, r[:, None])[:, 0] - lpx).detach()
        opd = opd - (A * lpx).sum()
        kl = kl + (lp.exp() * (lp - lq)).sum()
    return opd / n, kl / n

def grad(loss):
    S.zero_grad(); loss.backward(retain_graph=True)
    return torch.cat([p.grad.flatten().clone() for p in S.parameters()])

def set_step(vec, eta):
    i = 0
    with torch.no_grad():
        for p in S.parameters():
            p.add_(vec[i:i + p.numel()].view_as(p), alpha=-eta); i += p.numel()

b1, b2 = batch(11), batch(12)
opd, kl = losses(b1)
g_opd, g_kl = grad(opd), grad(kl)
cos = torch.nn.functional.cosine_similarity(g_opd, g_kl, dim=0).item()
print(f"KL(batch1) {kl.item():.4f}  cos(g_opd, g_kl) {cos:+.3f}  |g_opd| {g_opd.norm():.3f} |g_kl| {g_kl.norm():.3f}")
with torch.no_grad():
    kl2 = losses(b2)[1].item()
print(f"KL(batch2) {kl2:.4f}")
for name, g in (("opd", g_opd), ("kl", g_kl)):
    for eta in (1e-3, 3e-3, 1e-2):
        d = g / g.norm()
        set_step(d, eta)
        with torch.no_grad():
            a, b = losses(b1)[1].item(), losses(b2)[1].item()
        set_step(d, -eta)
        print(f"step along -g_{name}/|g| by {eta:g}: KL batch1 {a:.4f}  KL batch2 {b:.4f}")
for name, g in (("opd", g_opd), ("kl", g_kl)):
    for lr in (3e-5, 1e-4, 5e-4):
        d = torch.sign(g)
        set_step(d, lr)
        with torch.no_grad():
            a, b = losses(b1)[1].item(), losses(b2)[1].item()
        set_step(d, -lr)
        print(f"Adam-like first step lr*sign(g_{name}), lr {lr:g}: KL batch1 {a:.4f}  KL batch2 {b:.4f}")
