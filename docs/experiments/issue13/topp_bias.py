"""topp_bias.py: the expected sampled-token OPD update on one position's logits, exactly (no sampling).

For a student ``p = softmax(z)`` and teacher ``q`` over V tokens, the sampled-token OPD surrogate's
gradient-descent direction on the logits, with tokens drawn from the behaviour ``mu``, is

    dz = E_{x ~ mu}[ A(x) (e_x - p) ],   A(x) = log q(x) - log p(x)   (A detached, ratio 1 at pass 0).

With ``mu = p`` (top-p 1) this is ``-grad_z KL(p || q)``: the reverse KL falls. With ``mu`` = p truncated to
its top-p nucleus and renormalised (how the rollouts are sampled at top-p 0.9), tail tokens are never
drawn, and the negative mean of A (its mean is about -KL) pushes every drawn (nucleus) token down
against ``p``: the tail gains mass even where the teacher gives it less. Prints, for random
student / teacher pairs, the first-order change of the tail mass and of KL(p || q) per unit step.
"""
import torch

torch.manual_seed(0)
V, top_p = 10, 0.9


def direction(z, lq, mu):
    p = z.softmax(-1)
    A = lq - p.log()
    return (mu[:, None] * A[:, None] * (torch.eye(V, dtype=z.dtype) - p[None])).sum(0)


def nucleus(p):
    order = p.argsort(descending=True)
    excl = p[order].cumsum(0) - p[order]
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[excl < top_p]] = True
    return keep


rows = []
for _ in range(1000):
    z = torch.randn(V, dtype=torch.float64) * 2
    lq = (torch.randn(V, dtype=torch.float64) * 2 + 0.5 * z).log_softmax(-1)  # a teacher correlated with the student
    p = z.softmax(-1)
    keep = nucleus(p)
    if keep.all():
        continue
    mu_trunc = torch.where(keep, p, torch.zeros_like(p))
    mu_trunc /= mu_trunc.sum()
    out = []
    for mu in (p, mu_trunc):
        zz = z.clone().requires_grad_()
        pp = zz.softmax(-1)
        tail = pp[~keep].sum()
        kl = (pp * (pp.log() - lq)).sum()
        g_tail, = torch.autograd.grad(tail, zz, retain_graph=True)
        g_kl, = torch.autograd.grad(kl, zz)
        d = direction(z, lq, mu)
        out += [float(g_tail @ d), float(g_kl @ d)]
    q_tail = float(lq.exp()[~keep].sum())
    rows.append((*out, float(p[~keep].sum()), q_tail))
r = torch.tensor(rows)
n = len(r)
print(f"{n} random positions with a nonempty tail (top-p {top_p}); d/dstep of the tail mass and of KL(p||q):")
for name, c_tail, c_kl in (("mu = p (top-p 1)", 0, 1), ("mu = nucleus of p (top-p 0.9)", 2, 3)):
    print(f"  {name:30s} tail mass rises in {int((r[:, c_tail] > 0).sum()):4d} / {n}, "
          f"KL falls in {int((r[:, c_kl] < 0).sum()):4d} / {n}")
teacher_less = r[:, 5] < r[:, 4]
print(f"  where the teacher puts less mass on the tail than the student ({int(teacher_less.sum())} positions): "
      f"the tail rises in {int((r[teacher_less, 0] > 0).sum())} (top-p 1) vs "
      f"{int((r[teacher_less, 2] > 0).sum())} (top-p 0.9)")
