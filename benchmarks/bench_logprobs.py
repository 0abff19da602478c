"""Micro-benchmark: sampled-token log-probs + top-32 + Block-64-gated OPD loss, forward and backward.

Chunked (``fused_logprobs``) vs naive (full float32 ``[B,T,V]`` logits and ``log_softmax``), at
B=1, T=8192, V=151,936, hidden 1024 on CPU by default. Each variant runs in its own subprocess so that
its peak resident memory (``ru_maxrss``) is its own; "peak extra" is that peak minus the resident size
after the inputs were allocated.

    python benchmarks/bench_logprobs.py                      # the README figures
    python benchmarks/bench_logprobs.py --T 1024 --repeats 1  # quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run_variant(variant: str, B: int, T: int, V: int, H: int, K: int, chunk: int, repeats: int) -> dict:
    from opdkit.gates import block_segments, drift_gate
    from opdkit.losses import fused_logprobs, reduce_loss, sampled_token_opd
    from opdkit.losses.logprobs import naive_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(B, T, H, generator=g) * 0.05).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    logp_teacher = -torch.rand(B, T, generator=g) * 5
    noise = torch.randn(B, T, generator=g) * 0.01
    seg = block_segments(mask, 64)
    base = _rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if variant == "chunked":
            out = fused_logprobs(hidden, weight, ids, topk=K, chunk_size=chunk)
        else:
            out = naive_logprobs(hidden @ weight.T, ids, topk=K)
        logp = out.logp_BT
        logp_old = logp.detach() + noise
        gate = drift_gate(logp, logp_old, mask, seg)
        loss = reduce_loss(sampled_token_opd(logp, logp_old, logp_teacher, mask), mask, weights_BT=gate)
        loss.backward()
        times.append(time.perf_counter() - t0)
        hidden.grad = weight.grad = None
        del out, logp, loss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "time_s": min(times), "peak_extra_mb": peak - base, "inputs_mb": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--V", type=int, default=151_936)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=1024, help="positions per chunk (chunked variant)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="naive,chunked")
    ap.add_argument("--_child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a._child:
        print(json.dumps(_run_variant(a._child, a.B, a.T, a.V, a.H, a.K, a.chunk, a.repeats)))
        return
    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--_child", v] + [f"--{k}={getattr(a, k)}" for k in
                                                         ("B", "T", "V", "H", "K", "chunk", "repeats", "threads")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"variant": v, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"B={a.B} T={a.T} V={a.V} H={a.H} K={a.K} chunk={a.chunk} threads={a.threads} "
          f"(fwd+bwd, best of {a.repeats})")
    print(f"{'variant':<10}{'time (s)':>10}{'peak extra (MB)':>18}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<10}  failed: {r['error']}")
        else:
            print(f"{r['variant']:<10}{r['time_s']:>10.2f}{r['peak_extra_mb']:>18.0f}")
    ok = {r["variant"]: r for r in rows if "error" not in r}
    if {"naive", "chunked"} <= set(ok):
        n, c = ok["naive"], ok["chunked"]
        print(f"chunked/naive: time {c['time_s'] / n['time_s']:.2f}x, "
              f"peak extra memory {100 * c['peak_extra_mb'] / n['peak_extra_mb']:.1f}%")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
