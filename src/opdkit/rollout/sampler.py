"""Rollout sampling with the behaviour student (docs/methods.md §1, §2.5): a hand-written batched decode loop.

:func:`sample_rollouts` repeats each prompt ``samples_per_prompt`` times, left-pads the prompts, runs
one prefill and one cached forward per new token, and records for each sampled token its behaviour
log-prob ``logp_old`` = log-softmax of the raw float32 logits at temperature 1 over the full vocabulary
(§0): what :func:`opdkit.rollout.scoring.response_logprobs` recomputes from the same weights (to 1e-4
in float32, observed ~1e-6: cached and uncached forwards differ only in floating-point order).

Why not ``model.generate``: sampling small models is overhead-bound. Here (1) the KV cache lives in
preallocated buffers read through views (``DynamicCache`` re-concatenates the whole cache every step);
(2) the 4D attention mask is a view of one buffer (no mask construction per step); (3) Qwen3 / Qwen2 /
Llama decoders run a lean step with a third of the ops of transformers' layers (:class:`_LeanStep`);
(4) sampling is inverse-CDF on the device, with no host sync except an "all rows finished?" check
(every step on CPU, every 8 on CUDA). ``benchmarks/bench_sampler.py`` compares with ``generate``.

Randomness comes only from ``generator``: one seed drawn from it per call seeds a generator on the
model's device, so the same generator state gives the same batch (bit-exact resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.scoring import decoder_and_head

KV_CACHES = ("preallocated", "dynamic", "static")


@dataclass(frozen=True)
class SamplingParams:
    """How rollouts are sampled (docs/methods.md §2.5 defaults: temperature 1.0, top-p 0.9).

    temperature: > 0; logits are divided by it before top-k / top-p (use ``top_k=1`` for greedy).
    top_p: nucleus mass in (0, 1]; 1 disables it. top_k: keep the k largest logits; 0 disables it.
    max_new_tokens: response length cap (>= 1). min_new_tokens: EOS is suppressed before this many
    tokens (0 <= min_new_tokens <= max_new_tokens). samples_per_prompt: rows per prompt (>= 1).
    """

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    samples_per_prompt: int = 1

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


class _PreallocatedLayer(DynamicLayer):
    """KV-cache layer with buffers sized for the whole rollout; ``update`` returns views ``[B,H,len,D]``."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self._k = key_states.new_empty(B, H, self.capacity, D)
        self._v = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, s = key_states.shape[-2], self.length
        if s + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {s + n} > capacity {self.capacity}")
        self._k.narrow(2, s, n).copy_(key_states)
        self._v.narrow(2, s, n).copy_(value_states)
        self.length = s + n
        self.keys, self.values = self._k.narrow(2, 0, self.length), self._v.narrow(2, 0, self.length)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _make_cache(kind: str, config, capacity: int):
    if kind != "preallocated":
        return DynamicCache(config=config) if kind == "dynamic" else StaticCache(config=config, max_cache_len=capacity)
    n_layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[_PreallocatedLayer(capacity) for _ in range(n_layers)])


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw from ``generator`` (global RNG when None)."""
    dev = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=dev).item())
    return torch.Generator(device=device).manual_seed(seed)


def _sorted_values(z_BV: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending (values only). On CPU numpy's SIMD sort is several times faster."""
    if z_BV.device.type == "cpu":
        return torch.from_numpy(np.sort(z_BV.numpy(), axis=-1))
    return z_BV.sort(dim=-1).values


def _sample_next(logits_BV: torch.Tensor, params: SamplingParams, gen: torch.Generator,
                 eos_E: torch.Tensor | None) -> torch.Tensor:
    """One token per row ``[B]`` from temperature → (EOS suppression) → top-k → top-p filtered logits.

    Filters are thresholds in logit space: top-k keeps ``z >= k-th largest``; top-p keeps the tokens
    whose more-likely tokens hold < ``top_p`` of the (top-k renormalised) mass, i.e. it drops the
    least likely tail of mass <= ``1 − top_p`` as ``transformers``' ``TopPLogitsWarper`` does (the most
    likely token is always kept; exact ties at a threshold are kept together). Sampling is inverse-CDF
    on the device, ``first v with cumsum(p)_v >= u``, ``u ~ U(0, Σp]``: one uniform per row, no host sync,
    and a token of probability 0 can never be drawn.
    """
    z_BV = logits_BV / params.temperature if params.temperature != 1.0 else logits_BV
    if eos_E is not None:
        z_BV = z_BV.index_fill(1, eos_E, float("-inf"))
    V = z_BV.shape[1]
    top_k = params.top_k if 0 < params.top_k < V else 0
    thresh_B1 = None
    if params.top_p < 1.0:
        zs_BV = _sorted_values(z_BV)
        if top_k:
            zs_BV[:, : V - top_k] = float("-inf")
        cum_BV = torch.softmax(zs_BV, dim=-1).cumsum_(dim=-1)
        n_drop_B1 = (cum_BV <= 1.0 - params.top_p).sum(dim=-1, keepdim=True).clamp_max_(V - 1)
        thresh_B1 = zs_BV.gather(1, n_drop_B1)
    elif top_k:
        thresh_B1 = z_BV.topk(top_k, dim=-1).values[:, -1:]
    if thresh_B1 is not None:
        z_BV = z_BV.masked_fill(z_BV < thresh_B1, float("-inf"))
    cum_BV = torch.softmax(z_BV, dim=-1).cumsum_(dim=-1)
    u_B1 = torch.rand((z_BV.shape[0], 1), generator=gen, device=z_BV.device, dtype=cum_BV.dtype)
    u_B1 = (1.0 - u_B1).mul_(cum_BV[:, -1:])  # in (0, total]
    return torch.searchsorted(cum_BV, u_B1).squeeze(1).clamp_max_(V - 1)


def _left_pad(prompts: list[list[int]], repeats: int, pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    P = max(len(p) for p in prompts)
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
                    kv_cache: str = "preallocated", check_every: int | None = None) -> RolloutBatch:
    """Sample ``samples_per_prompt`` responses per prompt with ``model`` (a causal LM, e.g. Qwen3).

    Args:
        prompts: token ids per prompt (any lengths >= 1; left-padded here).
        params: :class:`SamplingParams`.
        eos_token_ids: a row stops at the first of these; the EOS token is kept (mask 1).
        pad_token_id: fills prompt left padding and response right padding (mask 0 there).
        generator: the only source of randomness (CPU or device); None uses torch's global RNG.
        prompt_indices: data-set row of each prompt (default ``0..n-1``); group_offset: rows from prompt
            ``i`` get group id ``group_offset + i``. answers: reference answer per prompt (repeated).
        progress: show a tqdm bar (one host sync per update).
        kv_cache: "preallocated" (default, fastest), "dynamic" (``DynamicCache``) or "static"
            (``StaticCache``, attention over the full fixed length).
        check_every: steps between "all rows finished?" checks (a host sync); default 1 on CPU, 8 on CUDA.

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
    decoder, weight_VH = decoder_and_head(model)
    vocab_size = min(model.get_input_embeddings().weight.shape[0], weight_VH.shape[0])
    _validate(prompts, eos_token_ids, pad_token_id, vocab_size, prompt_indices, answers)
    device, S = weight_VH.device, params.samples_per_prompt
    prompt_ids_BP, prompt_mask_BP = _left_pad(prompts, S, pad_token_id, device)
    eos_E = torch.as_tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = _decode(model.config, decoder, weight_VH, prompt_ids_BP, prompt_mask_BP, params, eos_E,
                          pad_token_id, _device_generator(generator, device), kv_cache,
                          check_every or (8 if device.type == "cuda" else 1), progress, _is_small(model))
    finally:
        model.train(was_training)
    response_ids_BT, response_mask_BT, logp_old_BT, ended_B = (x.clone() for x in out)  # leave inference mode
    pidx = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
    return RolloutBatch(
        prompt_ids_BP=prompt_ids_BP, prompt_mask_BP=prompt_mask_BP,
        response_ids_BT=response_ids_BT, response_mask_BT=response_mask_BT, logp_old_BT=logp_old_BT,
        group_ids_B=(torch.arange(len(prompts), device=device) + group_offset).repeat_interleave(S),
        prompt_index_B=torch.as_tensor(pidx, dtype=torch.long, device=device).repeat_interleave(S),
        stop_reasons=["eos" if e else "length" for e in ended_B.tolist()],
        answers=[a for a in answers for _ in range(S)] if answers is not None else [],
    ).trimmed()


class _DecodeStep:
    """Generic step: the decoder's own forward on new tokens ``[B]`` → hidden states ``[B,H]``. Masks are
    views of one ``[B, P + N]`` buffer (4D boolean for SDPA, else 2D); a static cache opens a column per step.
    """

    def __init__(self, config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str):
        (B, P), device = prompt_mask_BP.shape, prompt_mask_BP.device
        self.decoder, self.cache, self.P, self.static = decoder, cache, P, kv_cache == "static"
        layer_types = set(getattr(config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"])
        self.mask4d = config._attn_implementation == "sdpa" and layer_types == {"full_attention"}
        self.allowed_BL = torch.cat([prompt_mask_BP.bool(), torch.full((B, N), not self.static, device=device)], 1)
        self.mask_B11L, self.mask_2d_BL = self.allowed_BL[:, None, None, :], self.allowed_BL.long()
        self.pos_BN = prompt_mask_BP.sum(dim=1, keepdim=True) + torch.arange(N, device=device)[None]

    def mask(self, t: int) -> torch.Tensor:
        L = self.P + t + 1
        if self.static:
            self.allowed_BL[:, L - 1] = True
            return self.mask_B11L if self.mask4d else self.mask_2d_BL.copy_(self.allowed_BL)
        return self.mask_B11L[..., :L] if self.mask4d else self.mask_2d_BL[:, :L]

    def __call__(self, tok_B: torch.Tensor, t: int) -> torch.Tensor:
        mask = self.mask(t)
        out = self.decoder(input_ids=tok_B[:, None], attention_mask=mask, position_ids=self.pos_BN[:, t:t + 1],
                           past_key_values=self.cache, use_cache=True)  # a 4D mask is used as given
        return out.last_hidden_state[:, 0]


_LEAN_MODEL_TYPES = ("qwen3", "qwen2", "llama")
SMALL_MODEL_PARAMS = 100_000_000


def _is_small(model) -> bool:
    """Small models are overhead-bound: worth fused, pre-transposed weight copies made per call."""
    return sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMS


class _LeanStep(_DecodeStep):
    """The same step for Qwen3 / Qwen2 / Llama decoders, written with few torch ops.

    Same math as transformers' layers (pre-norm, optional q/k RMSNorm, RoPE from the model's own
    ``rotary_emb`` computed once for all steps, GQA SDPA, SiLU-gated MLP) with about a third of the ops.
    For small models (:func:`_is_small`) q/k/v and gate/up are fused into one matmul each and all
    weights are copied once per call as contiguous ``[in, out]`` matrices (small-batch CPU GEMMs are
    ~1.6x faster that way). Float32 hidden states match transformers' forward to ~1e-6.
    """

    @staticmethod
    def supported(config, decoder, kv_cache: str) -> bool:
        text = config.get_text_config(decoder=True)
        rope = (getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
        full = set(getattr(text, "layer_types", None) or ["full_attention"]) == {"full_attention"}
        if not (kv_cache == "preallocated" and getattr(text, "model_type", None) in _LEAN_MODEL_TYPES and full
                and getattr(text, "hidden_act", None) == "silu" and "dynamic" not in rope and rope != "longrope"
                and all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))):
            return False
        # Plain Linear layers only (no LoRA / quantized wrappers) and no hooks (e.g. accelerate offloading).
        return all(type(m) is torch.nn.Linear for name, m in decoder.named_modules() if name.endswith("_proj")) \
            and not any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in decoder.modules())

    def __init__(self, config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str, dtype, small: bool):
        super().__init__(config, decoder, cache, prompt_mask_BP, N, kv_cache)
        self.mask4d = True  # this step calls SDPA itself, with an additive mask (faster than boolean on CPU)
        self.mask_B11L = torch.zeros(self.mask_B11L.shape, dtype=dtype, device=self.pos_BN.device).masked_fill_(
            ~self.mask_B11L, float("-inf"))
        cos_BND, sin_BND = decoder.rotary_emb(decoder.embed_tokens.weight[:1].to(dtype), self.pos_BN)
        self.cos_BN1D, self.sin_BN1D = cos_BND[:, :, None], sin_BND[:, :, None]

        def lin(*mods):  # [(weight [in, out], bias)]: one fused matmul when small, else one per module
            ws, bs = [m.weight for m in mods], [m.bias for m in mods]
            if not small:
                return [(w.T, b) for w, b in zip(ws, bs)]
            b = None if all(x is None for x in bs) else torch.cat(
                [x if x is not None else w.new_zeros(w.shape[0]) for x, w in zip(bs, ws)])
            return [(torch.cat(ws).T.contiguous(), b)]

        text = config.get_text_config(decoder=True)
        self.layers = []
        for layer in decoder.layers[: text.num_hidden_layers]:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, lin(a.q_proj, a.k_proj, a.v_proj), getattr(a, "q_norm", None),
                                getattr(a, "k_norm", None), lin(a.o_proj)[0], layer.post_attention_layernorm,
                                lin(mlp.gate_proj, mlp.up_proj), lin(mlp.down_proj)[0]))
        self.nh, self.nkv, self.inter = text.num_attention_heads, text.num_key_value_heads, mlp.up_proj.out_features
        self.D, self.scale = a.head_dim, a.scaling

    @staticmethod
    def _norm(module, x):
        return F.rms_norm(x, x.shape[-1:], module.weight, module.variance_epsilon)

    @staticmethod
    def _proj(x, weights, sizes):
        """The outputs of the projections in ``weights`` (one fused matmul split into views, or one each)."""
        outs = [x @ w if b is None else torch.addmm(b, x, w) for w, b in weights]
        return outs[0].split(sizes, dim=-1) if len(outs) == 1 else outs

    def __call__(self, tok_B: torch.Tensor, t: int) -> torch.Tensor:
        mask = self.mask(t)
        B, nh, nkv, D = tok_B.shape[0], self.nh, self.nkv, self.D
        cos, sin = self.cos_BN1D[:, t], self.sin_BN1D[:, t]  # [B, 1, D]
        h_BH = self.decoder.embed_tokens(tok_B)
        for i, (n_in, qkv, q_norm, k_norm, (w_o, b_o), n_post, gate_up, (w_d, b_d)) in enumerate(self.layers):
            q, k, v = self._proj(self._norm(n_in, h_BH), qkv, (nh * D, nkv * D, nkv * D))
            q, k = q.view(B, nh, D), k.view(B, nkv, D)
            q = self._norm(q_norm, q) if q_norm is not None else q
            k = self._norm(k_norm, k) if k_norm is not None else k
            qk = torch.cat([q, k], 1)  # RoPE on q and k at once: x·cos + rotate_half(x)·sin
            qk = qk * cos + torch.cat([-qk[..., D // 2:], qk[..., : D // 2]], -1) * sin
            keys, values = self.cache.layers[i].update(qk[:, nh:, None], v.view(B, nkv, 1, D))
            o = F.scaled_dot_product_attention(qk[:, :nh].reshape(B, nkv, nh // nkv, D), keys, values,
                                               attn_mask=mask, scale=self.scale)  # GQA: query heads by kv head
            h_BH = torch.addmm(h_BH if b_o is None else h_BH + b_o, o.reshape(B, nh * D), w_o)
            gate, up = self._proj(self._norm(n_post, h_BH), gate_up, (self.inter, self.inter))
            h_BH = torch.addmm(h_BH if b_d is None else h_BH + b_d, F.silu(gate) * up, w_d)
        return self._norm(self.decoder.norm, h_BH)


def _decode(config, decoder, weight_VH, prompt_ids_BP, prompt_mask_BP, params: SamplingParams, eos_E,
            pad_token_id: int, gen: torch.Generator, kv_cache: str, check_every: int, progress: bool,
            small: bool):
    """The decode loop. Returns response ids / mask ``[B,T]``, ``logp_old_BT`` and ``ended_B`` (hit EOS).

    Per step: one cached decoder forward, ``h W^T``, sampling, log-softmax gather, EOS bookkeeping;
    no host sync except the every-``check_every``-steps "all finished" check.
    """
    (B, P), N, device = prompt_ids_BP.shape, params.max_new_tokens, prompt_ids_BP.device
    cache = _make_cache(kv_cache, config, P + N)
    step = (_LeanStep(config, decoder, cache, prompt_mask_BP, N, kv_cache, weight_VH.dtype, small)
            if _LeanStep.supported(config, decoder, kv_cache) else
            _DecodeStep(config, decoder, cache, prompt_mask_BP, N, kv_cache))
    out = decoder(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP,
                  position_ids=(prompt_mask_BP.cumsum(dim=1) - 1).clamp_min(0),
                  past_key_values=cache, use_cache=True)
    h_BH = out.last_hidden_state[:, -1]
    W_HV = weight_VH.T.contiguous() if small else weight_VH.T
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    toks, logps, dones = [], [], []
    bar = tqdm(total=N, desc=f"sampling {B} rows", unit="step", leave=False) if progress else None
    for t in range(N):
        logits_BV = (h_BH @ W_HV).float()
        tok_B = _sample_next(logits_BV, params, gen, eos_E if t < params.min_new_tokens else None)
        tok_B = tok_B.masked_fill_(done_B, pad_token_id)
        logps.append(torch.log_softmax(logits_BV, dim=-1).gather(1, tok_B[:, None]).squeeze(1))
        toks.append(tok_B)
        dones.append(done_B)
        done_B = done_B | torch.isin(tok_B, eos_E)
        if bar is not None and (t + 1) % 16 == 0:
            bar.update(16)
        if t == N - 1 or ((t + 1) % check_every == 0 and bool(done_B.all())):
            break
        h_BH = step(tok_B, t)
    if bar is not None:
        bar.update(t + 1 - bar.n)
        bar.close()
    response_mask_BT = (~torch.stack(dones, dim=1)).long()
    logp_old_BT = torch.where(response_mask_BT.bool(), torch.stack(logps, dim=1), 0.0)
    return torch.stack(toks, dim=1), response_mask_BT, logp_old_BT, done_B
