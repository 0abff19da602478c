"""Rollout sampling with the behaviour student (docs/methods.md §1, §2.5): a batched decode loop.

:func:`sample_rollouts` repeats each prompt ``samples_per_prompt`` times, left-pads the prompts, runs
one prefill and one cached forward per new token, and records for each sampled token its behaviour
log-prob ``logp_old`` = log-softmax of the float32 logits at temperature 1 over the full vocabulary
(§0): what :func:`opdkit.rollout.scoring.response_logprobs` recomputes from the same weights (to 1e-4
in float32, observed ~1e-6: cached and uncached forwards differ only in floating-point order).

Precision and memory: the decoder runs in one *sampling dtype* (``dtype``; default the autocast dtype
when autocast is on and the weights are float32, else the weights' dtype) with autocast off. When it
differs from the weights' dtype a sampling copy of the model is kept (per model) and refreshed from
the master weights at the start of every call, so no weight is cast per token. The LM head runs in
float32 on the (sampling-dtype) hidden states. The KV cache holds that one dtype; its size is bounded
by ``SamplingParams.max_cache_gb``: the rows are sampled in chunks that fit. Finished rows leave the
active batch (the cache, masks and positions are compacted) once a quarter of it has finished; with a
static step, in halving buckets (:func:`rows_to_keep`).

Randomness: one seed drawn from ``generator`` per call; the uniform of row ``r`` at step ``t`` is a
hash of (seed, r, t) (:func:`opdkit.rollout.token_sampling.row_uniforms`), so chunking and dropping
finished rows do not change any row's samples, and the same generator state gives the same batch
(bit-exact resume).

Why not ``model.generate``: sampling small models is overhead-bound. Here (1) the KV cache lives in
preallocated buffers read through views (``DynamicCache`` re-concatenates the whole cache every step);
(2) masks are views of one buffer, and none at all without left padding; (3) Qwen3 / Qwen2 / Llama run
a lean step checked against the model's own forward (:mod:`opdkit.rollout.decode_steps`); (4)
sampling is inverse-CDF on the device with a top-k-prefiltered top-p; the host syncs on an "all rows
finished?" check (every step on CPU, every 8 on CUDA). ``benchmarks/bench_sampler.py`` compares with
``generate``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from opdkit.rollout import decode_steps, graph_step
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.decode_steps import KV_CACHES, kv_bytes_per_token, make_cache, prefill
from opdkit.rollout.graph_step import StaticStep, static_mode
from opdkit.rollout.scoring import decoder_and_head
from opdkit.rollout.token_sampling import TopPFilter, row_uniforms, sample_next

__all__ = ["KV_CACHES", "SamplingParams", "sample_rollouts"]


@dataclass(frozen=True)
class SamplingParams:
    """How rollouts are sampled (docs/methods.md §2.5 defaults: temperature 1.0, top-p 0.9).

    temperature: > 0; logits are divided by it before top-k / top-p (use ``top_k=1`` for greedy).
    top_p: nucleus mass in (0, 1]; 1 disables it. top_k: keep the k largest logits; 0 disables it.
    max_new_tokens: response length cap (>= 1). min_new_tokens: EOS is suppressed before this many
    tokens (0 <= min_new_tokens <= max_new_tokens). samples_per_prompt: rows per prompt (>= 1).
    max_cache_gb: KV-cache budget in GB (1e9 bytes) per call; rows are sampled in chunks that fit
    (opdkit extension); 0 = no limit (one chunk). static_decode: decode with the static-shape step of
    :mod:`opdkit.rollout.graph_step` (Qwen3 / Qwen2 / Llama), compiled once on CPU, captured as a CUDA
    graph on CUDA; finished rows then stay in the batch, and prompts are left-padded to a multiple of
    :data:`STATIC_PROMPT_MULTIPLE` tokens while decoding (few shapes to compile) (opdkit extension; same
    tokens up to rounding).
    """

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    samples_per_prompt: int = 1
    max_cache_gb: float = 0.0
    static_decode: bool = False

    def __post_init__(self):
        def bad(name, rng):
            raise ValueError(f"SamplingParams.{name} must be {rng}, got {getattr(self, name)!r}")

        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            bad("temperature", "a finite number > 0 (use top_k=1 for greedy decoding)")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            bad("top_p", "in (0, 1] (1 disables nucleus filtering)")
        for name, lo in (("top_k", 0), ("max_new_tokens", 1), ("samples_per_prompt", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                bad(name, f"an integer >= {lo}" + (" (0 disables top-k)" if name == "top_k" else ""))
        v = self.min_new_tokens
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= self.max_new_tokens:
            bad("min_new_tokens", f"an integer in [0, max_new_tokens={self.max_new_tokens}]")
        if not (isinstance(self.max_cache_gb, (int, float)) and math.isfinite(self.max_cache_gb)
                and self.max_cache_gb >= 0):
            bad("max_cache_gb", "a finite number of GB >= 0 (0 = no limit)")
        if not isinstance(self.static_decode, bool):
            bad("static_decode", "True or False")


#: With ``static_decode`` the padded prompt length is rounded up to a multiple of this many tokens, so a
#: data set of varied prompt lengths meets a few decode shapes (compiles / graph captures), not one per
#: length; the extra columns are left padding (masked), dropped from the returned batch.
STATIC_PROMPT_MULTIPLE = 32


def _left_pad(prompts: list[list[int]], repeats: int, pad_token_id: int, device,
              multiple: int = 1) -> tuple[torch.Tensor, ...]:
    P = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids_NP = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask_NP = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_NP[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask_NP[i, P - len(p):] = 1
    return (ids_NP.repeat_interleave(repeats, 0).to(device), mask_NP.repeat_interleave(repeats, 0).to(device))


def _validate(prompts, eos_token_ids, pad_token_id, vocab_size, prompt_indices, answers):
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample_rollouts needs at least one prompt, and every prompt at least one token "
                         "(a prompt is empty)")
    bad = [i for i, p in enumerate(prompts) if min(p) < 0 or max(p) >= vocab_size]
    if bad:
        raise ValueError(f"prompt {bad[0]} has a token id outside [0, {vocab_size}) (the model's vocabulary)")
    if not eos_token_ids:
        raise ValueError("eos_token_ids must list at least one id (e.g. the tokenizer's eos_token_id)")
    for name, ids in (("eos_token_ids", list(eos_token_ids)), ("pad_token_id", [pad_token_id])):
        if any(not 0 <= int(t) < vocab_size for t in ids):
            raise ValueError(f"{name} {ids} outside the model vocabulary [0, {vocab_size})")
    for name, v in (("prompt_indices", prompt_indices), ("answers", answers)):
        if v is not None and len(v) != len(prompts):
            raise ValueError(f"{name} has {len(v)} entries for {len(prompts)} prompts")




def sample_rollouts(model, prompts: list[list[int]], params: SamplingParams, *, eos_token_ids: list[int],
                    pad_token_id: int, generator: torch.Generator | None = None,
                    prompt_indices: list[int] | None = None, group_offset: int = 0,
                    answers: list[str] | None = None, progress: bool = False,
                    kv_cache: str = "preallocated", check_every: int | None = None,
                    dtype: torch.dtype | None = None) -> RolloutBatch:
    """Sample ``samples_per_prompt`` responses per prompt with ``model`` (a causal LM, e.g. Qwen3).

    Args:
        prompts: token ids per prompt (any lengths >= 1; left-padded here).
        params: :class:`SamplingParams` (its ``max_cache_gb`` bounds the KV cache: rows in chunks).
        eos_token_ids: a row stops at the first of these; the EOS token is kept (mask 1).
        pad_token_id: fills prompt left padding and response right padding (mask 0 there).
        generator: the only source of randomness (CPU or device); None uses torch's global RNG.
        prompt_indices: data-set row of each prompt (default ``0..n-1``); group_offset: rows from prompt
            ``i`` get group id ``group_offset + i``. answers: reference answer per prompt (repeated).
        progress: show a tqdm bar (one host sync per update).
        kv_cache: "preallocated" (default, fastest; finished rows are dropped), "dynamic"
            (``DynamicCache``) or "static" (``StaticCache``, attention over the full fixed length).
        check_every: steps between "all rows finished?" checks (a host sync); default 1 on CPU, 8 on CUDA.
        dtype: the sampling dtype (decoder and KV cache); default the active autocast dtype for float32
            weights, else the weights' dtype.

    Returns a :class:`RolloutBatch` on the model's device with B = len(prompts) × samples_per_prompt
    rows (row ``i·S + s`` is sample ``s`` of prompt ``i``), responses ``[B,T]`` with T the longest
    response, ``logp_old_BT`` float32 (0 on padding) and ``stop_reasons`` "eos" / "length". The model
    runs in eval mode under ``torch.inference_mode()`` (its training flag is restored afterwards); the
    returned tensors are ordinary tensors, usable in autograd.
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    _, weight_VH = decoder_and_head(model)
    vocab_size = min(model.get_input_embeddings().weight.shape[0], weight_VH.shape[0])
    _validate(prompts, eos_token_ids, pad_token_id, vocab_size, prompt_indices, answers)
    device, S = weight_VH.device, params.samples_per_prompt
    prompt_ids_BP, prompt_mask_BP = _left_pad(prompts, S, pad_token_id, device,
                                              STATIC_PROMPT_MULTIPLE if params.static_decode else 1)
    eos_E = torch.as_tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long, device=device)
    dtype = _sampling_dtype(model, dtype, device)
    B, L = prompt_ids_BP.shape[0], prompt_ids_BP.shape[1] + params.max_new_tokens
    chunk = _rows_per_chunk(model.config, dtype, B, L, params.max_cache_gb)
    seed = _draw_seed(generator)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False), decode_attention(device):
            smodel = _sampling_model(model, dtype)
            decoder, _ = decoder_and_head(smodel)
            small = decode_steps.is_small(model)
            W_HV = weight_VH.float().T  # float32 LM head on sampling-dtype hidden states
            W_HV = W_HV.contiguous() if small else W_HV
            rows_B = torch.arange(B, device=device)
            outs = [_decode(smodel.config, decoder, W_HV, prompt_ids_BP[c:c + chunk], prompt_mask_BP[c:c + chunk],
                            rows_B[c:c + chunk], params, eos_E, pad_token_id, seed, kv_cache,
                            check_every or (8 if device.type == "cuda" else 1), progress, small, dtype)
                    for c in range(0, B, chunk)]
    finally:
        model.train(was_training)
    response_ids_BT, response_mask_BT, logp_old_BT, ended_B = _concat(outs, pad_token_id)  # leaves inference mode
    pidx = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
    return RolloutBatch(
        prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP,
        response_ids_BT=response_ids_BT, response_mask_BT=response_mask_BT, logp_old_BT=logp_old_BT,
        group_ids_B=(torch.arange(len(prompts), device=device) + group_offset).repeat_interleave(S),
        prompt_index_B=torch.as_tensor(pidx, dtype=torch.long, device=device).repeat_interleave(S),
        stop_reasons=["eos" if e else "length" for e in ended_B.tolist()],
        answers=[a for a in answers for _ in range(S)] if answers is not None else [],
    ).trimmed()


def decode_attention(device: torch.device):
    """SDPA backends for decoding on CUDA: flash, memory-efficient, math; not cuDNN. cuDNN attention builds
    an execution plan per new shape, and a decode loop meets a new key length at every step: measured on
    an H200 (torch 2.11), lean-step sampling of 512 tokens with a new prompt length took 36 s with it and
    7.4 s without (docs/experiments/issue15). A no-op elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed drawn from ``generator`` (torch's global RNG when None)."""
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())


def _sampling_dtype(model, dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    w = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if dtype is not None:
        return dtype
    if w == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return w


_SAMPLING_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sampling_model(model, dtype: torch.dtype):
    """``model`` itself when its weights are ``dtype``; else its sampling copy in ``dtype`` (made once per
    model, kept, and refreshed from the master weights here, i.e. once per call and so after every
    optimizer step). The copy's buffers (e.g. RoPE frequencies) stay as they are."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == dtype for p in params):
        return model
    entry = _SAMPLING_COPIES.get(model)
    if entry is None or entry[0] != dtype:
        # deepcopy with the parameters pre-filled in the memo: no full-precision copy is ever made
        memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in params}
        entry = _SAMPLING_COPIES[model] = (dtype, copy.deepcopy(model, memo).eval())
        return entry[1]
    for p, q in zip(model.parameters(), entry[1].parameters()):
        q.copy_(p.detach())
    return entry[1]


def _rows_per_chunk(config, dtype: torch.dtype, B: int, L: int, max_cache_gb: float) -> int:
    """Rows whose KV cache of ``L`` tokens fits in ``max_cache_gb`` (all ``B`` when the budget is 0)."""
    if not max_cache_gb:
        return B
    per_row = kv_bytes_per_token(config, dtype) * L
    rows = int(max_cache_gb * 1e9 // per_row)
    if rows < 1:
        raise ValueError(f"SamplingParams.max_cache_gb = {max_cache_gb} GB holds no row: one row of {L} tokens "
                         f"needs {per_row / 1e9:.3g} GB of KV cache; raise rollout.max_cache_gb or lower "
                         "rollout.max_new_tokens")
    return min(rows, B)


def _concat(outs, pad_token_id: int):
    """Chunks' (ids, mask, logp, ended) joined along rows, right-padded to the longest chunk."""
    T = max(o[0].shape[1] for o in outs)

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    return (torch.cat([pad(o[0], pad_token_id) for o in outs]), torch.cat([pad(o[1], 0) for o in outs]),
            torch.cat([pad(o[2], 0.0) for o in outs]), torch.cat([o[3] for o in outs]))


class _NextToken:
    """The eager next-token head of the decode loop: float32 logits ``h W``, the filtered inverse-CDF draw
    with the uniforms of the active rows at step ``t`` (EOS suppressed before ``min_new_tokens``) and the
    behaviour log-prob of the drawn token (temperature 1, full vocabulary) → ``(tok_A, logp_A)``."""

    def __init__(self, W_HV, params: SamplingParams, eos_E, u_BN):
        self.W_HV, self.p, self.eos_E, self.u_BN, self.top_p_filter = W_HV, params, eos_E, u_BN, TopPFilter()

    def __call__(self, h_AH, act_A, t: int):
        p = self.p
        logits_AV = h_AH.float() @ self.W_HV
        u_A1 = self.u_BN[act_A, t:t + 1] if len(act_A) < len(self.u_BN) else self.u_BN[:, t:t + 1]
        tok_A = sample_next(logits_AV, p.temperature, p.top_k, p.top_p, u_A1,
                            self.eos_E if t < p.min_new_tokens else None, self.top_p_filter)
        return tok_A, torch.log_softmax(logits_AV, dim=-1).gather(1, tok_A[:, None]).squeeze(1)


def rows_to_keep(done_A: torch.Tensor, halving: bool) -> torch.Tensor | None:
    """Which rows of the active batch to keep (sorted indices), or None to keep the batch as it is.

    Dynamic shapes: the unfinished rows, once a quarter of the batch has finished. Static shapes
    (``halving``; one captured step per batch size): the batch shrinks to ceil(A/2), again while the
    unfinished rows fit in half, and is filled up with finished rows, so one chunk meets at most
    log2(B) + 1 sizes and never computes more than twice its unfinished rows (finished rows are masked).
    """
    A, n_live = len(done_A), int((~done_A).sum())
    if not halving:
        return (~done_A).nonzero().squeeze(1) if 4 * (A - n_live) >= A > 1 else None
    size = A
    while n_live <= (size + 1) // 2 < size:
        size = (size + 1) // 2
    if size == A:
        return None
    live_L, done_D = (~done_A).nonzero().squeeze(1), done_A.nonzero().squeeze(1)
    return torch.cat([live_L, done_D[: size - n_live]]).sort().values


def _decode(config, decoder, W_HV, prompt_ids_BP, prompt_mask_BP, rows_B, params: SamplingParams, eos_E,
            pad_token_id: int, seed: int, kv_cache: str, check_every: int, progress: bool, small: bool, dtype):
    """The decode loop over one chunk. Returns response ids / mask ``[B,T]``, ``logp_old_BT``, ``ended_B``.

    Per step: one cached decoder forward on the active rows ``act_A`` (positions in the chunk), ``h W^T``
    in float32, sampling with the uniforms of the rows' global ids ``rows_B``, log-softmax gather, EOS
    bookkeeping; the host syncs only on the every-``check_every``-steps check, which also drops
    finished rows (:func:`rows_to_keep`; preallocated cache only, not from a compiled static step).
    """
    (B, P), N, device = prompt_ids_BP.shape, params.max_new_tokens, prompt_ids_BP.device
    cache = make_cache(kv_cache, config, P + N, dtype)
    static = static_mode(device) if params.static_decode else ""
    step = graph_step.pick_decode_step(config, decoder, cache, prompt_mask_BP, N, kv_cache, dtype, small, static)
    static_shapes = isinstance(step, StaticStep)
    drop_rows = kv_cache == "preallocated" and getattr(step, "drops_rows", True)
    h_AH = prefill(decoder, cache, prompt_ids_BP, prompt_mask_BP)
    tok_BN = torch.full((B, N), pad_token_id, dtype=torch.long, device=device)
    logp_BN = torch.zeros((B, N), dtype=torch.float32, device=device)
    alive_BN, ended_B = torch.zeros((B, N), dtype=torch.bool, device=device), torch.zeros_like(rows_B, dtype=torch.bool)
    act_A, done_A = torch.arange(B, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    u_BN = row_uniforms(seed, rows_B, torch.arange(N, device=device))
    head = _NextToken(W_HV, params, eos_E, u_BN)
    tok_A, logp_A = head(h_AH, act_A, 0)
    bar = tqdm(total=N, desc=f"sampling {B} rows", unit="step", leave=False) if progress else None
    for t in range(N):
        tok_A = tok_A.masked_fill_(done_A, pad_token_id)
        rows = act_A if len(act_A) < B else slice(None)  # a slice until rows are dropped: no index_put
        tok_BN[rows, t], logp_BN[rows, t], alive_BN[rows, t] = tok_A, logp_A.masked_fill_(done_A, 0.0), ~done_A
        done_A = done_A | torch.isin(tok_A, eos_E)
        if bar is not None and (t + 1) % 16 == 0:
            bar.update(16)
        if t == N - 1:
            break
        if (t + 1) % check_every == 0:
            n_done = int(done_A.sum())
            if n_done == len(act_A):
                break
            if drop_rows and (keep_A := rows_to_keep(done_A, static_shapes)) is not None:
                ended_B[act_A[done_A]] = True
                for layer in cache.layers:
                    layer.select(keep_A)
                step.select(keep_A)
                act_A, done_A, tok_A = act_A[keep_A], done_A[keep_A], tok_A[keep_A]
        tok_A, logp_A = head(step(tok_A, t), act_A, t + 1)
    if bar is not None:
        bar.update(t + 1 - bar.n)
        bar.close()
    ended_B[act_A] = done_A
    return tok_BN[:, : t + 1], alive_BN[:, : t + 1].long(), logp_BN[:, : t + 1], ended_B
