"""Run by tests/test_distributed.py under torch.distributed.run (gloo): the bucketed gradient all-reduce
equals one all-reduce per parameter, on every process.

Parameters of two dtypes and several shapes; a bucket size small enough for several buckets and for one
parameter larger than a bucket; one parameter with a gradient on rank 0 only (summed as zeros
elsewhere) and one with none anywhere (stays None). Exits non-zero on a mismatch.
"""

import faulthandler
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from opdkit.train.grad_sync import all_reduce_grads

faulthandler.dump_traceback_later(120, exit=True)  # never hang CI

SHAPES = [((7, 5), torch.float32), ((300,), torch.float32), ((4, 3), torch.float64), ((2, 2), torch.float32),
          ((11,), torch.float32), ((3, 3), torch.float32)]
ONLY_RANK0, NOWHERE = 3, 5  # indices into SHAPES


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(100 + rank)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in SHAPES]
    for i, p in enumerate(params):
        if i == NOWHERE or (i == ONLY_RANK0 and rank != 0):
            continue
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    # reference: one all-reduce per parameter; a gradient missing here counts as zeros
    ref = []
    for i, p in enumerate(params):
        if i == NOWHERE:
            ref.append(None)
            continue
        t = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(t)
        ref.append(t)
    all_reduce_grads([*params, frozen], SimpleNamespace(num_processes=world), bucket_bytes=256)
    ok = frozen.grad is None
    for p, r in zip(params, ref):
        if r is None:
            ok &= p.grad is None
        else:
            eps = torch.finfo(p.dtype).eps  # two-term sums: exact in any order; allow one rounding
            ok &= p.grad is not None and torch.allclose(p.grad, r, rtol=eps, atol=0.0)
    print(f"rank {rank}: {'ok' if ok else 'MISMATCH'}")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
