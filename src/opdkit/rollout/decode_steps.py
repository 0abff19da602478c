"""Decode steps and KV caches of the rollout sampler (:mod:`opdkit.rollout.sampler`).

:class:`DecodeStep` runs the decoder's own forward (transformers' layers and attention) on one new
token per row; :class:`LeanStep` is a hand-written step for Qwen3 / Qwen2 / Llama with about a third of
the ops (sampling small models is overhead-bound). The lean step is used only after
:func:`lean_step_agrees` has compared it with the model's own forward on a small input (once per
decoder and dtype); when they disagree (another transformers version, a changed layer) the sampler
falls back to :class:`DecodeStep` with a warning.

The preallocated cache (:class:`PreallocatedLayer`) holds K and V in one dtype given up front (the
sampling dtype), sized for the whole rollout, and can drop finished rows (:func:`select_rows`).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

KV_CACHES = ("preallocated", "dynamic", "static")
LEAN_MODEL_TYPES = ("qwen3", "qwen2", "llama")
SMALL_MODEL_PARAMS = 100_000_000


class PreallocatedLayer(DynamicLayer):
    """KV-cache layer with ``[B, H, capacity, D]`` buffers of one ``dtype``; ``update`` returns views."""

    def __init__(self, capacity: int, dtype: torch.dtype):
        super().__init__()
        self.capacity, self.length, self.kv_dtype = capacity, 0, dtype

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = self.kv_dtype, key_states.device
        B, H, _, D = key_states.shape
        self._k = key_states.new_empty(B, H, self.capacity, D, dtype=self.kv_dtype)
        self._v = value_states.new_empty(B, H, self.capacity, value_states.shape[-1], dtype=self.kv_dtype)
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

    def select(self, idx_A: torch.Tensor) -> None:
        """Keep rows ``idx_A`` only (new, smaller buffers: the memory of dropped rows is freed)."""
        self._k, self._v = self._k.index_select(0, idx_A), self._v.index_select(0, idx_A)
        self.keys, self.values = self._k.narrow(2, 0, self.length), self._v.narrow(2, 0, self.length)

    def get_seq_length(self) -> int:
        return self.length


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token of one row over all layers: ``layers · 2 · kv_heads · head_dim · itemsize``."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return text.num_hidden_layers * 2 * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()


def make_cache(kind: str, config, capacity: int, dtype: torch.dtype):
    if kind != "preallocated":
        return DynamicCache(config=config) if kind == "dynamic" else StaticCache(config=config, max_cache_len=capacity)
    n_layers = config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PreallocatedLayer(capacity, dtype) for _ in range(n_layers)])


def prefill(decoder, cache, prompt_ids_BP, prompt_mask_BP) -> torch.Tensor:
    """The decoder's own forward over the prompts (fills ``cache``); the last position's hidden ``[B,H]``."""
    mask = None if bool(prompt_mask_BP.all()) else prompt_mask_BP  # no padding: causal attention alone
    out = decoder(input_ids=prompt_ids_BP, attention_mask=mask,
                  position_ids=(prompt_mask_BP.cumsum(dim=1) - 1).clamp_min(0), past_key_values=cache, use_cache=True)
    return out.last_hidden_state[:, -1]


class DecodeStep:
    """Generic step: the decoder's own forward on new tokens ``[B]`` → hidden states ``[B,H]``. Masks are
    views of one ``[B, P + N]`` buffer (4D boolean for SDPA, else 2D); a static cache opens a column per step.
    Without left padding no mask is passed (SDPA / flash attention need none for one query per row).
    """

    def __init__(self, config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str):
        (B, P), device = prompt_mask_BP.shape, prompt_mask_BP.device
        self.decoder, self.cache, self.P, self.static = decoder, cache, P, kv_cache == "static"
        layer_types = set(getattr(config.get_text_config(decoder=True), "layer_types", None) or ["full_attention"])
        self.mask4d = config._attn_implementation == "sdpa" and layer_types == {"full_attention"}
        self.allowed_BL = torch.cat([prompt_mask_BP.bool(), torch.full((B, N), not self.static, device=device)], 1)
        self.pos_BN = prompt_mask_BP.sum(dim=1, keepdim=True) + torch.arange(N, device=device)[None]
        self._views()

    def _views(self):
        self.padded = self.static or not bool(self.allowed_BL[:, : self.P].all())
        self.mask_B11L, self.mask_2d_BL = self.allowed_BL[:, None, None, :], self.allowed_BL.long()

    def select(self, idx_A: torch.Tensor) -> None:
        """Keep rows ``idx_A`` of the per-row state (the cache is selected by the caller)."""
        self.allowed_BL, self.pos_BN = self.allowed_BL[idx_A], self.pos_BN[idx_A]
        self._views()

    def mask(self, t: int) -> torch.Tensor | None:
        if not self.padded:
            return None
        L = self.P + t + 1
        if self.static:
            self.allowed_BL[:, L - 1] = True
            return self.mask_B11L if self.mask4d else self.mask_2d_BL.copy_(self.allowed_BL)
        return self.mask_B11L[..., :L] if self.mask4d else self.mask_2d_BL[:, :L]

    def __call__(self, tok_B: torch.Tensor, t: int) -> torch.Tensor:
        out = self.decoder(input_ids=tok_B[:, None], attention_mask=self.mask(t),
                           position_ids=self.pos_BN[:, t:t + 1], past_key_values=self.cache,
                           use_cache=True)  # a 4D mask is used as given
        return out.last_hidden_state[:, 0]


def lean_supported(config, decoder, kv_cache: str) -> bool:
    """Architecture and module checks of :class:`LeanStep` (its numbers are checked by :func:`lean_step_agrees`)."""
    text = config.get_text_config(decoder=True)
    rope = (getattr(text, "rope_parameters", None) or {}).get("rope_type", "default")
    full = set(getattr(text, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    if not (kv_cache == "preallocated" and getattr(text, "model_type", None) in LEAN_MODEL_TYPES and full
            and getattr(text, "hidden_act", None) == "silu" and "dynamic" not in rope and rope != "longrope"
            and all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))):
        return False
    # Plain Linear layers only (no LoRA / quantized wrappers) and no hooks (e.g. accelerate offloading)
    # except the one gradient checkpointing adds to make embedding outputs require grad (moot here).
    def hooked(m):
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
        return hasattr(m, "_hf_hook") or any(getattr(h, "__name__", "") not in _HARMLESS_HOOKS for h in hooks)

    return all(type(m) is torch.nn.Linear for name, m in decoder.named_modules() if name.endswith("_proj")) \
        and not any(hooked(m) for m in decoder.modules())


_HARMLESS_HOOKS = ("make_inputs_require_grads",)


class LeanStep(DecodeStep):
    """The same step for Qwen3 / Qwen2 / Llama decoders, written with few torch ops.

    Same math as transformers' layers (pre-norm, optional q/k RMSNorm, RoPE from the model's own
    ``rotary_emb`` computed once for all steps, GQA SDPA, SiLU-gated MLP) with about a third of the ops.
    For small models q/k/v and gate/up are fused into one matmul each and all weights are copied once
    per call as contiguous ``[in, out]`` matrices (small-batch CPU GEMMs are ~1.6x faster that way);
    otherwise the weights are used as they are (transposed views, no copy, no cast).
    """

    def __init__(self, config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str, dtype, small: bool):
        self.dtype = dtype
        super().__init__(config, decoder, cache, prompt_mask_BP, N, kv_cache)
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

    def _views(self):
        super()._views()
        # this step calls SDPA itself: an additive mask (faster than a boolean one on CPU), only with padding
        self.add_mask_B11L = torch.zeros(self.mask_B11L.shape, dtype=self.dtype, device=self.pos_BN.device
                                         ).masked_fill_(~self.mask_B11L, float("-inf")) if self.padded else None

    def select(self, idx_A: torch.Tensor) -> None:
        super().select(idx_A)
        self.cos_BN1D, self.sin_BN1D = self.cos_BN1D[idx_A], self.sin_BN1D[idx_A]

    @staticmethod
    def _norm(module, x):
        return F.rms_norm(x, x.shape[-1:], module.weight, module.variance_epsilon)

    @staticmethod
    def _proj(x, weights, sizes):
        """The outputs of the projections in ``weights`` (one fused matmul split into views, or one each)."""
        outs = [x @ w if b is None else torch.addmm(b, x, w) for w, b in weights]
        return outs[0].split(sizes, dim=-1) if len(outs) == 1 else outs

    def __call__(self, tok_B: torch.Tensor, t: int) -> torch.Tensor:
        mask = self.add_mask_B11L[..., : self.P + t + 1] if self.padded else None
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


#: Relative tolerance of the lean-vs-model check per dtype: a few roundings of the dtype over all layers.
LEAN_CHECK_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 6e-2, torch.float16: 1e-2}
_LEAN_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_run(step_cls, config, decoder, dtype, small, ids_BP, mask_BP, toks_NB):
    cache = make_cache("preallocated", config, ids_BP.shape[1] + len(toks_NB) + 1, dtype)
    extra = (dtype, small) if issubclass(step_cls, LeanStep) else ()
    step = step_cls(config, decoder, cache, mask_BP, len(toks_NB) + 1, "preallocated", *extra)
    hs = [prefill(decoder, cache, ids_BP, mask_BP)]
    hs += [step(tok_B, t) for t, tok_B in enumerate(toks_NB)]
    return torch.stack(hs).float()


def lean_step_agrees(config, decoder, dtype: torch.dtype, small: bool, step_cls=None) -> bool:
    """Whether :class:`LeanStep` (or ``step_cls``, a subclass run eagerly) gives the decoder's own hidden
    states on a small input (2 rows, one left-padded, 3 decode steps):
    ``max|h_lean − h_model| <= rtol · max(1, max|h_model|)``. The verdict is cached per decoder module and
    (dtype, small, class); a disagreement warns once."""
    step_cls = step_cls or LeanStep
    key = (dtype, small) if step_cls is LeanStep else (dtype, small, step_cls.__name__)
    verdicts = _LEAN_VERDICTS.setdefault(decoder, {})
    if key in verdicts:
        return verdicts[key]
    device, V = decoder.embed_tokens.weight.device, decoder.embed_tokens.num_embeddings
    g = torch.Generator().manual_seed(0)
    ids_BP = torch.randint(0, V, (2, 5), generator=g).to(device)
    mask_BP = torch.ones_like(ids_BP)
    mask_BP[1, :2] = 0
    toks_NB = torch.randint(0, V, (3, 2), generator=g).to(device)
    ref = _check_run(DecodeStep, config, decoder, dtype, small, ids_BP, mask_BP, toks_NB)
    try:
        lean = _check_run(step_cls, config, decoder, dtype, small, ids_BP, mask_BP, toks_NB)
        err = float((lean - ref).abs().max())
    except Exception as e:  # noqa: BLE001 - any failure of the hand-written path means: use the model's own
        err, lean = float("inf"), e
    tol = LEAN_CHECK_RTOL.get(dtype, 1e-2) * max(1.0, float(ref.abs().max()))
    ok = err <= tol  # NaN compares False
    if not ok:
        instead = "the lean step" if step_cls is not LeanStep else "the model's forward"
        warnings.warn(f"opdkit sampler: the {step_cls.__name__} decode step disagrees with the model's own forward "
                      f"(max |diff| {err:.3g} > {tol:.3g}{'' if not isinstance(lean, Exception) else f'; {lean!r}'}); "
                      f"sampling with {instead} instead (slower, same results)", stacklevel=3)
    verdicts[key] = ok
    return ok


def is_small(model) -> bool:
    """Small models are overhead-bound: worth fused, pre-transposed weight copies made per call."""
    return sum(p.numel() for p in model.parameters()) <= SMALL_MODEL_PARAMS


def decode_step(config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str, dtype, small: bool):
    """The lean step when supported and checked, else the model's own forward."""
    if lean_supported(config, decoder, kv_cache) and lean_step_agrees(config, decoder, dtype, small):
        return LeanStep(config, decoder, cache, prompt_mask_BP, N, kv_cache, dtype, small)
    return DecodeStep(config, decoder, cache, prompt_mask_BP, N, kv_cache)
