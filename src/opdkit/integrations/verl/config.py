"""Typed loss config for verl: ``distillation.distillation_loss._target_`` points here.

Instantiating it (hydra ``_target_``, in the driver and in every Ray worker) imports
:mod:`opdkit.integrations.verl`, which registers opdkit's losses with verl before verl looks the
``loss_mode`` up. Every setting the exact derivation relies on is validated; errors say what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from verl.workers.config import DistillationLossConfig

from opdkit.gates.registry import SEGMENTERS, SegmentParams
from opdkit.integrations.verl.guards import VerlIntegrationError
from opdkit.integrations.verl.losses import LOSS_MODES
from opdkit.integrations.verl.tokens import load_tokenizer, newline_token_ids, token_ids

GATE_SCOPES = ("batch", "sequence", "none")


@dataclass
class OpdkitDistillationLossConfig(DistillationLossConfig):
    """verl's ``DistillationLossConfig`` plus opdkit's gate / masking / surrogate settings (methods.md §2-§5).

    ``loss_mode``: ``opdkit_opd`` (sampled-token OPD §2.1), ``opdkit_lsm`` (top-K LSM §2.2) or
    ``opdkit_sg_opd`` (§2.1 with SG-OPD's sign gate §5.1). ``clip_ratio`` is ε of §2.1 (``clip_ratio_low`` /
    ``clip_ratio_high`` must equal it). The surrogate is opdkit's, so verl's own policy-gradient wrapper,
    loss clamps and task-reward mixing must be off.
    """

    loss_mode: str = "opdkit_opd"
    use_task_rewards: bool = False
    use_policy_gradient: bool = False
    loss_max_clamp: float | None = None
    log_prob_min_clamp: float | None = None
    dual_clip: float | None = 3.0
    gate: str = "none"
    block_size: int = 64
    tau: float = 1.0
    gate_scope: str = "batch"
    newline_token_ids: list[int] = field(default_factory=list)
    newline_min_len: int = 16
    newline_max_len: int = 128
    newline_fallback: int = 64
    special_token_ids: list[int] = field(default_factory=list)
    special_tokens: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    sg_lambda: float = 1.8
    sg_beta: float = 1.0

    _mutable_fields = DistillationLossConfig._mutable_fields | {"newline_token_ids", "special_token_ids"}

    def __post_init__(self):
        self._resolve_token_ids()
        self._validate()
        super().__post_init__()

    def _resolve_token_ids(self) -> None:
        """Fill ``special_token_ids`` from ``special_tokens`` and, for ``gate=newline``, ``newline_token_ids``
        from the tokenizer at ``tokenizer`` (the shipped YAMLs point it at the student model)."""
        need_newline = self.gate == "newline" and not self.newline_token_ids
        if not (self.special_tokens or need_newline):
            return
        if not self.tokenizer:
            raise VerlIntegrationError("distillation.distillation_loss: special_tokens / gate=newline need "
                                       "tokenizer=PATH (e.g. ${actor_rollout_ref.model.path}) to find the token ids")
        tok = load_tokenizer(self.tokenizer)
        if self.special_tokens:
            self.special_token_ids = sorted(set(self.special_token_ids) | set(token_ids(tok, self.special_tokens)))
        if need_newline:
            self.newline_token_ids = newline_token_ids(tok)

    def _validate(self) -> None:
        def bad(msg: str) -> VerlIntegrationError:
            return VerlIntegrationError(f"distillation.distillation_loss: {msg}")

        if self.loss_mode not in LOSS_MODES:
            raise bad(f"loss_mode={self.loss_mode!r} is not an opdkit loss; valid: {', '.join(LOSS_MODES)} "
                      "(for verl's own losses drop the opdkit _target_)")
        if self.use_policy_gradient:
            raise bad("set use_policy_gradient=false: opdkit's loss already is the PPO surrogate (§2.1); verl's "
                      "wrapper would use advantages = -loss and apply a second surrogate")
        if self.use_task_rewards:
            raise bad("set use_task_rewards=false: the exact-denominator hook rescales the whole gradient, "
                      "which would also rescale verl's task-reward policy loss (SG-OPD: loss_mode=opdkit_sg_opd)")
        if self.loss_max_clamp is not None or self.log_prob_min_clamp is not None:
            raise bad("set loss_max_clamp=null and log_prob_min_clamp=null: a clamp changes the loss and zeroes "
                      "its gradient where it binds, so it would no longer be docs/methods.md's formula")
        if not (self.clip_ratio == self.clip_ratio_low == self.clip_ratio_high):
            raise bad(f"clip_ratio_low / clip_ratio_high ({self.clip_ratio_low}, {self.clip_ratio_high}) must equal "
                      f"clip_ratio ({self.clip_ratio}): §2.1's clip is symmetric (ε)")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise bad(f"dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.gate not in SEGMENTERS:
            raise bad(f"gate={self.gate!r}; valid: {', '.join(SEGMENTERS)}")
        if self.gate_scope not in GATE_SCOPES:
            raise bad(f"gate_scope={self.gate_scope!r}; valid: {', '.join(GATE_SCOPES)}")
        if self.gate == "newline" and not self.newline_token_ids:
            raise bad("gate=newline needs newline_token_ids (the ids whose text contains a newline): set "
                      "tokenizer=PATH and they are read from it")
        if self.block_size < 1 or self.tau < 0:
            raise bad(f"block_size must be >= 1 and tau >= 0, got {self.block_size}, {self.tau}")
        if self.loss_mode == "opdkit_lsm" and not self.topk:
            raise bad("loss_mode=opdkit_lsm needs topk > 0 (the paper: 32)")

    @property
    def segment_params(self) -> SegmentParams:
        return SegmentParams(block_size=self.block_size, newline_token_ids=tuple(self.newline_token_ids),
                             newline_min_len=self.newline_min_len, newline_max_len=self.newline_max_len,
                             newline_fallback=self.newline_fallback)
