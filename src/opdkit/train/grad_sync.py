"""Gradient sum over data-parallel processes through flat buckets (one all-reduce per bucket).

One all-reduce per parameter (a Qwen3 model has ~300) pays the collective's latency ~300 times per
optimizer update; DDP instead packs gradients into ~25 MB buckets. :func:`all_reduce_grads` does the
same after the last micro-batch: parameters in order, consecutive ones of one dtype and device packed
into a flat buffer of at most ``bucket_bytes``, each buffer summed once and copied back.

Every process must call it with the same parameters, whatever it computed: a parameter whose gradient
is None here but not on another process (e.g. SG-OPD's NLL term on a process with no endorsed teacher
response) is summed as zeros; one that is None on every process stays None (so AdamW leaves it alone,
as on one process). Which is which is agreed with one small all-reduce of flags first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def _buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one dtype and device, at most ``bucket_bytes`` each (one larger
    parameter forms a bucket of its own)."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        last = out[-1][-1] if out else None
        if last is None or last.grad.dtype != p.grad.dtype or last.grad.device != p.grad.device \
                or size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += nbytes
    return out


def all_reduce_grads(params: Iterable[torch.nn.Parameter], world, *, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum ``p.grad`` over processes in place for the trainable ``params`` (``world``: an accelerate
    Accelerator, or None / one process: nothing to do). See the module docstring for None gradients."""
    if world is None or world.num_processes == 1:
        return
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(live, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        for p, g in zip(bucket, flat.split([p.grad.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p.grad))
