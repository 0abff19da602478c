"""The CPU miniature benchmark: variants and presets (a faithful miniature of docs/methods.md §4).

Every variant trains the same shipped student with the same budget; only the loss / gate / advantage
differ. Block and newline sizes are scaled to the miniature: a solution line is 10 tokens and a k = 12
trace 131 tokens (the paper: Block-64 on responses of thousands of tokens), so Block uses 16 tokens
(about 1.5 lines) and NewlineSpan merges spans under 8 tokens, splits spans over 32, and falls back to
Block-16.

The ``reuse`` preset reuses each rollout batch harder than the default (between the default and the
``fragile`` blow-up) and runs OPD, OPD+Block16 and OPD+NewlineSpan against the controls of
docs/methods.md §8 (see docs/extensions.md): the advantage recomputed under the current student,
token-level truncated IS, a sequence-level gate, an un-normalised gate and a |δ|-mean gate. Variants
that are not the paper's carry "(opdkit ext.)" in their label, so every table marks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MINI_GATE = ["gate.block_size=16", "gate.newline_min_len=8", "gate.newline_max_len=32",
             "gate.newline_fallback=16"]

# name -> (label in tables, overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "opd": ("OPD", ["loss.name=opd", "gate.name=none"]),
    "opd_block": ("OPD+Block16", ["loss.name=opd", "gate.name=block"]),
    "opd_newline": ("OPD+NewlineSpan", ["loss.name=opd", "gate.name=newline"]),
    "lsm": ("LSM", ["loss.name=lsm", "gate.name=none"]),
    "lsm_block": ("LSM+Block16", ["loss.name=lsm", "gate.name=block"]),
    "lsm_newline": ("LSM+NewlineSpan", ["loss.name=lsm", "gate.name=newline"]),
    "sg_opd": ("SG-OPD", ["loss.name=opd", "gate.name=none", "loss.advantage=sign_gated"]),
    "sg_opd_block": ("SG-OPD+Block16", ["loss.name=opd", "gate.name=block", "loss.advantage=sign_gated"]),
    # self-distillation (opdkit extension): the frozen initial student is the teacher, given the chain task's
    # reference solution before the problem (runtime.prompts.CONTEXT_PRESETS["solution"]); no external teacher
    "self_opd": ("Self-OPD (solution)", ["loss.name=opd", "gate.name=none", "model.teacher=self",
                                         "teacher.context=solution"]),
}
# the reuse controls (docs/methods.md §8): not the paper's, so labelled as opdkit extensions
EXT = " (opdkit ext.)"
CONTROLS: dict[str, tuple[str, list[str]]] = {
    "opd_recompute": ("OPD+recomputed A" + EXT, ["loss.name=opd", "gate.name=none", "loss.advantage=recompute"]),
    "opd_tis": ("OPD-TIS" + EXT, ["loss.name=opd_tis", "gate.name=none"]),
    "opd_seq": ("OPD+Sequence" + EXT, ["loss.name=opd", "gate.name=sequence"]),
    "opd_block_raw": ("OPD+Block16 unnormalised" + EXT, ["loss.name=opd", "gate.name=block", "gate.normalize=none"]),
    "opd_block_abs": ("OPD+Block16 abs-mean" + EXT, ["loss.name=opd", "gate.name=block",
                                                     "gate.statistic=abs_mean"]),
}
VARIANTS.update(CONTROLS)
SIX = ["opd", "opd_block", "opd_newline", "lsm", "lsm_block", "lsm_newline"]


@dataclass(frozen=True)
class Preset:
    """Budget of one demo run. Counts name their unit."""

    name: str
    train: list[str] = field(default_factory=list)  # trainer overrides shared by every variant
    variants: tuple[str, ...] = tuple(SIX)
    eval_problems: int = 64  # problems per held-out benchmark
    eval_n: int = 8  # samples per problem (pass@1, pass@8)
    benchmarks: tuple[str, ...] = ("chain8", "chain12", "chain16", "chain24")
    description: str = ""


_COMMON = ["rollout.samples_per_prompt=4", "rollout.max_new_tokens=300", "rollout.reward=chain",
           "rollout.top_p=0.9", "loss.topk=8", "train.microbatch_size=16", "train.teacher_microbatch_size=16",
           "train.save_every_steps=0", "train.threads=1", "train.device=cpu", "optim.max_grad_norm=1.0",
           "train.stop_on_divergence=false",  # the demo measures collapses: warn (metrics.jsonl), never stop
           "data.prompt_template={problem}\n", "data.chat_template=false", "data.max_prompt_tokens=128",
           *MINI_GATE]

PRESETS: dict[str, Preset] = {
    "default": Preset(
        "default", [*_COMMON, "rollout.prompts_per_step=8", "train.train_steps=40", "train.rollout_passes=2",
                    "optim.lr=1e-4"],
        # the six variants and SG-OPD fit the 15-minute budget (#13 item 6); SG-OPD+Block16 and Self-OPD run with
        # --variants sg_opd_block,self_opd
        variants=(*SIX, "sg_opd"), eval_problems=32,
        description="40 rollout steps of 8 prompts x 4 samples, 2 passes per rollout batch, lr 1e-4"),
    "quick": Preset(
        "quick", [*_COMMON, "rollout.prompts_per_step=4", "train.train_steps=4", "train.rollout_passes=2",
                  "optim.lr=1e-4"],
        eval_problems=8, description="smoke run: 4 rollout steps, 8 problems per benchmark"),
    "fragile": Preset(
        "fragile", [*_COMMON, "rollout.prompts_per_step=8", "train.train_steps=40", "train.rollout_passes=4",
                    "optim.lr=1e-3"],
        variants=("opd", "opd_block", "opd_newline"), eval_problems=32,
        description="the fragile regime: lr 1e-3 (10x the default) and 4 passes per rollout batch"),
    "reuse": Preset(
        "reuse", [*_COMMON, "rollout.prompts_per_step=8", "train.train_steps=40", "train.rollout_passes=4",
                  "optim.lr=2e-4"],
        variants=("opd", "opd_block", "opd_newline", *CONTROLS), eval_problems=128,
        description="rollout reuse where drift matters: 4 passes per rollout batch and lr 2e-4 (2x the default's "
                    "2 and 1e-4; fragile: 4 and 1e-3); OPD, OPD+Block16, OPD+NewlineSpan and the controls of "
                    "docs/methods.md §8 (opdkit extensions)"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown demo preset {name!r}; valid: {', '.join(PRESETS)}") from None
