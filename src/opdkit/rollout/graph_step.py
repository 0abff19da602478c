"""A static-shape decode step: compiled once (CPU, ``torch.compile``) or captured once (CUDA, a CUDA graph).

Sampling is overhead-bound: :class:`~opdkit.rollout.decode_steps.LeanStep` still issues about 25 torch ops
per layer per token from Python, and each costs a dispatch on CPU and a kernel launch on a GPU (the H200
device check measured 12 ms per decode step of 32 rows of a 1.7B model, where the weights read take under
1 ms). :class:`StaticStep` is the lean step's math with static shapes only, so one trace serves every step:

- K and V are written into the preallocated buffers of the whole rollout (``[B, kv_heads, P + N, D]``,
  filled by the prefill) at a *tensor* position with ``index_copy_``;
- attention runs over all ``P + N`` positions with an additive mask that opens one more column per step
  (the columns after the current position are ``-inf``, so the result is the prefix attention's);
- the RoPE rows of the step are picked with a tensor index.

On CPU the step function is compiled by ``torch.compile(dynamic=False)`` (inductor fuses the norms,
RoPE, attention's softmax and the gated MLP into a few C++ kernels around the matmuls); it recompiles for
each new (rows, length, dtype), and the sampler pads prompts to a multiple of 32 tokens in this mode so
that varied prompt lengths meet few shapes; inductor's C++ wrapper calls the kernels
(:data:`COMPILE_OPTIONS`). On our 2-core CPU the compiled step samples about 1.4x faster than the lean step
(README, #15). On CUDA one decode step is captured as a CUDA graph per sampling chunk
and replayed per token (one launch per token instead of hundreds). Finished rows leave the batch in halving
buckets (:meth:`StaticStep.select`; the sampler halves the batch while its unfinished rows fit in half, so
a chunk meets at most log2(rows) + 1 batch sizes, each captured once), except in the CPU compile mode,
which keeps every row: a new batch size there is a new compile of seconds, and dynamo's recompile limit
would soon send the step back to eager. If compiling or capturing fails, the step warns once and runs
eagerly (same math).

The math is checked against the model's own forward before use, as the lean step's is
(:func:`opdkit.rollout.decode_steps.lean_step_agrees` with ``step_cls=StaticStep``, run eagerly).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from opdkit.rollout import decode_steps
from opdkit.rollout.decode_steps import LeanStep, lean_step_agrees, lean_supported

_COMPILED = {}  # one torch.compile wrapper of _step_fn per process: its cache holds every shape compiled
#: inductor options of the CPU compile: a C++ wrapper calls the graph's kernels (no Python between them);
#: measured about 8 % faster sampling on the bench workload, for a compile of about 8-15 s instead of 2-4 s
COMPILE_OPTIONS = {"cpp_wrapper": True}


def _step_fn(tok_B, pos_1, t_1, embed_VH, layers, kv, cos_BN1D, sin_BN1D, add_mask_B11L, col_L, norm_w, eps: float,
             nh: int, nkv: int, D: int, inter: int, scale: float, sdpa: bool):
    """One decode step with static shapes: new tokens ``tok_B`` at position ``pos_1`` (= P + t, a one-element
    tensor), step ``t_1`` → final-norm hidden states ``[B, H]``; K/V written into ``kv`` in place. ``sdpa``:
    attention by ``F.scaled_dot_product_attention`` (CUDA: flash kernels), else by explicit float32 math
    (CPU: for one query per row over a few hundred keys SDPA's flash kernel measured slower than two
    matmuls and a softmax inductor fuses around them)."""
    B = tok_B.shape[0]
    h_BH = F.embedding(tok_B, embed_VH)
    cos, sin = cos_BN1D.index_select(1, t_1).squeeze(1), sin_BN1D.index_select(1, t_1).squeeze(1)  # [B, 1, D]
    mask = add_mask_B11L.masked_fill(col_L > pos_1, float("-inf"))  # columns after the current one closed
    for (w_in, qkv, qn_w, kn_w, w_o, b_o, w_post, gate_up, w_d, b_d), (K, V) in zip(layers, kv):
        x = F.rms_norm(h_BH, h_BH.shape[-1:], w_in, eps)
        q, k, v = LeanStep._proj(x, qkv, (nh * D, nkv * D, nkv * D))
        q, k = q.view(B, nh, D), k.view(B, nkv, D)
        q = F.rms_norm(q, (D,), qn_w, eps) if qn_w is not None else q
        k = F.rms_norm(k, (D,), kn_w, eps) if kn_w is not None else k
        qk = torch.cat([q, k], 1)  # RoPE on q and k at once: x·cos + rotate_half(x)·sin
        qk = qk * cos + torch.cat([-qk[..., D // 2:], qk[..., : D // 2]], -1) * sin
        K.index_copy_(2, pos_1, qk[:, nh:, None].to(K.dtype))
        V.index_copy_(2, pos_1, v.view(B, nkv, 1, D).to(V.dtype))
        q_BKGD = qk[:, :nh].reshape(B, nkv, nh // nkv, D)  # GQA: query heads grouped by kv head
        if sdpa:
            o = F.scaled_dot_product_attention(q_BKGD, K, V, attn_mask=mask, scale=scale)
        else:  # one query per row: two small matmuls and a softmax, fused by inductor around the matmuls
            s_BKGL = (q_BKGD.float() @ K.float().transpose(-1, -2)) * scale + mask.float()
            o = (s_BKGL.softmax(dim=-1) @ V.float()).to(K.dtype)
        h_BH = torch.addmm(h_BH if b_o is None else h_BH + b_o, o.reshape(B, nh * D), w_o)
        g, u = LeanStep._proj(F.rms_norm(h_BH, h_BH.shape[-1:], w_post, eps), gate_up, (inter, inter))
        h_BH = torch.addmm(h_BH if b_d is None else h_BH + b_d, F.silu(g) * u, w_d)
    return F.rms_norm(h_BH, h_BH.shape[-1:], norm_w, eps)


class StaticStep(LeanStep):
    """:class:`LeanStep`'s math with static shapes; ``mode`` "compile" (CPU), "cuda_graph" or "eager"."""

    def __init__(self, config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str, dtype, small: bool,
                 mode: str = "eager"):
        super().__init__(config, decoder, cache, prompt_mask_BP, N, kv_cache, dtype, small)
        if mode not in ("eager", "compile", "cuda_graph"):
            raise ValueError(f"StaticStep mode must be eager, compile or cuda_graph, got {mode!r}")
        self.mode, self.graph, self.out_BH = mode, None, None
        device, L = self.pos_BN.device, self.allowed_BL.shape[1]
        self.col_L = torch.arange(L, device=device)
        self.pos_1, self.t_1 = (torch.zeros(1, dtype=torch.long, device=device) for _ in range(2))
        self.tok_B = torch.zeros(self.allowed_BL.shape[0], dtype=torch.long, device=device)
        # one RMSNorm eps for every norm (static_supported)
        self.eps = decoder.norm.variance_epsilon
        self.flat = [(n_in.weight, qkv, None if qn is None else qn.weight, None if kn is None else kn.weight, w_o, b_o,
                      n_post.weight, gu, w_d, b_d)
                     for n_in, qkv, qn, kn, (w_o, b_o), n_post, gu, (w_d, b_d) in self.layers]

    @property
    def drops_rows(self) -> bool:
        """Whether the sampler may drop finished rows: not when compiled (see the module docstring)."""
        return self.mode != "compile"

    def _views(self):
        decode_steps.DecodeStep._views(self)
        # an additive mask over all P + N columns, padding closed (the step closes the columns after t)
        self.add_mask_B11L = torch.zeros(self.mask_B11L.shape, dtype=self.dtype, device=self.pos_BN.device
                                         ).masked_fill_(~self.mask_B11L, float("-inf"))

    def select(self, idx_A: torch.Tensor) -> None:
        """Keep rows ``idx_A`` (the caller selects the cache); a CUDA graph is captured again on the new buffers."""
        if not self.drops_rows:
            raise RuntimeError("the compiled StaticStep keeps every row: a new batch size is a new compile")
        super().select(idx_A)
        self.tok_B = self.tok_B[idx_A]
        self.graph, self.out_BH = None, None

    def _args(self):
        kv = [(layer._k, layer._v) for layer in self.cache.layers]
        return (self.tok_B, self.pos_1, self.t_1, self.decoder.embed_tokens.weight, self.flat, kv, self.cos_BN1D,
                self.sin_BN1D, self.add_mask_B11L, self.col_L, self.decoder.norm.weight, self.eps, self.nh, self.nkv,
                self.D, self.inter, self.scale, self.pos_BN.device.type == "cuda")

    def _run(self):
        if self.mode == "compile":
            fn = _COMPILED.get("fn") or _COMPILED.setdefault("fn", torch.compile(_step_fn, dynamic=False,
                                                                                  options=COMPILE_OPTIONS))
            return fn(*self._args())
        if self.mode == "cuda_graph":
            if self.graph is None:
                self.graph, self.out_BH = _capture(self._args())
            self.graph.replay()
            return self.out_BH
        return _step_fn(*self._args())

    def __call__(self, tok_B: torch.Tensor, t: int) -> torch.Tensor:
        if t == 0:  # attention reads every column: the unwritten ones must be finite (0 · NaN is NaN)
            for layer in self.cache.layers:
                layer._k[:, :, self.P:].zero_()
                layer._v[:, :, self.P:].zero_()
        self.tok_B.copy_(tok_B)
        self.pos_1.fill_(self.P + t)
        self.t_1.fill_(t)
        try:
            return self._run().clone()
        except Exception as e:  # noqa: BLE001 - no compiler, capture refused...: the same math, eagerly
            if self.mode == "eager":
                raise
            warnings.warn(f"opdkit sampler: the {self.mode} decode step failed ({e!r:.300}); decoding eagerly "
                          "instead (same results, slower)", stacklevel=2)
            self.mode, self.graph = "eager", None
            return self._run().clone()


def _capture(args):
    """A CUDA graph of one :func:`_step_fn` call on the static buffers in ``args`` and its output buffer.
    Warm-up runs on a side stream first (as ``torch.cuda.graphs`` asks); they write K/V at the position
    held in ``args`` (the current step's), which the replay rewrites."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            _step_fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_BH = _step_fn(*args)
    return graph, out_BH


def pick_decode_step(config, decoder, cache, prompt_mask_BP, N: int, kv_cache: str, dtype, small: bool,
                     static: str = ""):
    """:class:`StaticStep` in mode ``static`` ("compile", "cuda_graph") when it is supported and its math
    agrees with the model's own forward (as the lean step's must too); else, and without ``static``,
    :func:`opdkit.rollout.decode_steps.decode_step` (the lean step or the model's forward)."""
    if (static and lean_supported(config, decoder, kv_cache) and lean_step_agrees(config, decoder, dtype, small)
            and static_supported(decoder) and lean_step_agrees(config, decoder, dtype, small, StaticStep)):
        return StaticStep(config, decoder, cache, prompt_mask_BP, N, kv_cache, dtype, small, static)
    return decode_steps.decode_step(config, decoder, cache, prompt_mask_BP, N, kv_cache, dtype, small)


def static_supported(decoder) -> bool:
    """One RMSNorm eps in the whole decoder (the step passes one)."""
    return len({m.variance_epsilon for m in decoder.modules() if hasattr(m, "variance_epsilon")}) == 1


def static_mode(device: torch.device) -> str:
    """The accelerated mode of :class:`StaticStep` on ``device``: a CUDA graph on CUDA, else torch.compile."""
    return "cuda_graph" if device.type == "cuda" else "compile"
