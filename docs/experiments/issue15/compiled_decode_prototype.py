"""Prototype (#15, not wired into the sampler): a static-shape decode step for the bench workload, eager vs
torch.compile, against the lean step. Static shapes: K/V buffers of the full length written with index_copy_
at a tensor position, attention over all positions with a mask, RoPE rows picked with a tensor index; so
torch.compile traces it once. Measured 2026-12-04, 1 thread, machine shared with one other job: lean step
0.651 s for 127 decode steps of 8 rows, static eager 0.786 s, static compiled 0.42-0.51 s after a 19 s
compile. Run: PYTHONPATH=src python docs/experiments/issue15/compiled_decode_prototype.py
"""
import time

import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
from opdkit.rollout import decode_steps
from opdkit.rollout.decode_steps import make_cache, prefill
s = tiny_qwen3(TinyQwen3Spec(vocab_size=768, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=768), seed=0).eval()
dec = s.model
B,P,N=8,20,128
ids=torch.randint(3,768,(B,P)); mask=torch.ones_like(ids)
cfg=s.config; nh, nkv, D = 4, 2, 64; L = P+N

def step_fn(tok_B, t, K_l, V_l, emb, Ws, cos_BN1D, sin_BN1D, addmask_BL, eps, scale, inter):
    # static shapes: K_l/V_l [B, nkv, L, D] buffers written at index P + t; attention over all L with a mask
    B = tok_B.shape[0]
    h = F.embedding(tok_B, emb)
    cos = cos_BN1D.index_select(1, t).squeeze(1); sin = sin_BN1D.index_select(1, t).squeeze(1)
    pos = t + P
    m = torch.where(torch.arange(L)[None, :] <= pos, addmask_BL, torch.tensor(float("-inf")))[:, None, None, :]
    for i,(w_in, wqkv, wqn, wkn, wo, w_post, wgu, wd) in enumerate(Ws):
        x = F.rms_norm(h, (h.shape[-1],), w_in, eps)
        q, k, v = (x @ wqkv).split((nh*D, nkv*D, nkv*D), -1)
        q = F.rms_norm(q.view(B, nh, D), (D,), wqn, eps); k = F.rms_norm(k.view(B, nkv, D), (D,), wkn, eps)
        qk = torch.cat([q, k], 1)
        qk = qk * cos + torch.cat([-qk[..., D // 2:], qk[..., : D // 2]], -1) * sin
        K_l[i].index_copy_(2, pos.view(1), qk[:, nh:, None])
        V_l[i].index_copy_(2, pos.view(1), v.view(B, nkv, 1, D))
        qq = qk[:, :nh].reshape(B, nkv, nh//nkv, D)
        sc = torch.matmul(qq, K_l[i].transpose(-1, -2)) * scale + m
        o = torch.matmul(sc.softmax(-1), V_l[i])
        h = h + o.reshape(B, nh*D) @ wo
        x = F.rms_norm(h, (h.shape[-1],), w_post, eps)
        g, u = (x @ wgu).split((inter, inter), -1)
        h = h + (F.silu(g) * u) @ wd
    return h

def prep():
    Ws=[]
    for layer in dec.layers:
        a, mlp = layer.self_attn, layer.mlp
        Ws.append((layer.input_layernorm.weight, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T.contiguous(),
                   a.q_norm.weight, a.k_norm.weight, a.o_proj.weight.T.contiguous(), layer.post_attention_layernorm.weight,
                   torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).T.contiguous(), mlp.down_proj.weight.T.contiguous()))
    return Ws
pos_BN = mask.sum(1, keepdim=True) + torch.arange(N)[None]
with torch.inference_mode():
    cos, sin = dec.rotary_emb(dec.embed_tokens.weight[:1], pos_BN)
    cos, sin = cos[:, :, None], sin[:, :, None]
    Ws = prep()
    eps = dec.layers[0].input_layernorm.variance_epsilon
    addmask = torch.zeros(B, L)
    def run(f):
        K_l=[torch.zeros(B,nkv,L,D) for _ in range(4)]; V_l=[torch.zeros(B,nkv,L,D) for _ in range(4)]
        tok=torch.randint(3,768,(B,))
        t0=time.perf_counter()
        for t in range(N-1):
            h=f(tok, torch.tensor([t]), K_l, V_l, dec.embed_tokens.weight, Ws, cos, sin, addmask, eps, 0.125, 768)
        return time.perf_counter()-t0, h
    te, he = run(step_fn)
    print("eager static", round(te,3))
    cf = torch.compile(step_fn, dynamic=False)
    t0=time.perf_counter(); tc, hc = run(cf); print("compiled first (incl compile)", round(time.perf_counter()-t0,1))
    print("compiled", [round(run(cf)[0],3) for _ in range(3)], "maxdiff", float((hc-he).abs().max()))
    # reference: LeanStep eager
    cache=make_cache("preallocated", cfg, P+N, torch.float32)
    st=decode_steps.LeanStep(cfg, dec, cache, mask, N, "preallocated", torch.float32, True)
    prefill(dec, cache, ids, mask); tok=torch.randint(3,768,(B,))
    t0=time.perf_counter()
    for t in range(N-1): st(tok,t)
    print("LeanStep eager", round(time.perf_counter()-t0,3))
