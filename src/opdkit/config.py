"""Typed configuration: nested dataclasses, loaded from YAML with ``key=value`` overrides.

Every field carries a help text (``opdkit train --help`` prints them all). Loading checks types and
values and says which field is wrong and what would be valid. Counts name their unit. ``§n`` in a help
text is a section of ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opdkit.gates.drift import BLOCK_STATISTICS, GATE_NORMALIZATIONS
from opdkit.gates.registry import SEGMENTERS
from opdkit.losses.reduction import REDUCTION_MODES
from opdkit.losses.registry import BASE_LOSSES
from opdkit.runtime.graders import REWARD_CHOICES
from opdkit.runtime.models import ADAMW, ATTN_CHOICES, AUTOCAST, DEVICE_CHOICES, DTYPE_CHOICES
from opdkit.runtime.prompts import (
    CHAT_TEMPLATE_CHOICES,
    CONTEXT_PRESETS,
    QWEN_MATH_TEMPLATE,
    chat_setting,
    resolve_context,
)
from opdkit.runtime.settings import ConfigError, F, apply_mapping, parse_overrides
from opdkit.runtime.settings import field_help as _field_help
from opdkit.train.behaviour import BEHAVIOUR_LOGPROBS
from opdkit.train.sg_opd import ADVANTAGES

__all__ = ["QWEN_MATH_TEMPLATE", "Config", "ConfigError", "F", "field_help", "load_config", "phase_steps",
           "parse_overrides", "save_config", "to_dict", "validate"]


@dataclass
class ModelConfig:
    student: str = F("", "student: local path (save_pretrained dir) or hub id; it samples and learns")
    teacher: str = F("", "teacher: local path or hub id; scores every sampled token. 'self': a frozen copy of the "
                         "initial student (loaded again from model.student), 'self-current': the live student "
                         "itself, scored under no_grad (no gradient through the teacher pass); both need "
                         "teacher.context (self-distillation, opdkit extension)")
    tokenizer: str = F("", "tokenizer path or id (default: the student's)")
    dtype: str = F("auto", "student weights dtype: auto (float32 weights; autocast: train.autocast), float32, "
                           "bfloat16")
    teacher_dtype: str = F("auto", "teacher weights dtype (auto as above)")
    trust_remote_code: bool = F(False, "allow model code from the hub (off: only transformers' own code)")
    lora_r: int = F(0, "LoRA rank through peft; 0 trains all weights")
    lora_alpha: int = F(16, "LoRA alpha")
    lora_dropout: float = F(0.0, "LoRA dropout")
    lora_target_modules: list = F(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj"], "modules LoRA adapts")
    gradient_checkpointing: bool = F(False, "recompute activations in backward to save memory")
    attn_implementation: str = F("sdpa", "transformers' attention for the student's and teacher's forwards "
                                         "(prefill, teacher scoring, update): sdpa (transformers' default), eager "
                                         "(on CPU faster for rows of a few hundred tokens, README #15; it keeps "
                                         "a T x T score tensor per layer and head), flash_attention_2, ...")


@dataclass
class DataConfig:
    train_file: str = F("", "training prompts: a JSON Lines file (required per row: problem, answer; "
                            "optional: id, default <stem>-<line>), or a registered "
                            "name (dapo17k, math500, ...) resolved in data_dir")
    data_dir: str = F("", "directory of the math data files (dapo17k, math500, ...); default: $OPDKIT_DATA_DIR")
    hf_dataset: str = F("", "Hugging Face dataset name instead of train_file (needs `datasets`)")
    hf_split: str = F("train", "split of hf_dataset")
    problem_field: str = F("problem", "field holding the problem text")
    answer_field: str = F("answer", "field holding the reference answer")
    prompt_template: str = F(QWEN_MATH_TEMPLATE, "prompt text; {problem} is replaced by the problem "
                                                     "(other braces are literal)")
    chat_template: str | bool = F("on", "wrap the prompt in the tokenizer's chat template when it has one: on, off, "
                                       "auto (off for the miniature's chain problems, else on); true / false "
                                       "read as on / off")
    max_prompt_tokens: int = F(1024, "prompts longer than this many tokens are dropped (and counted)")
    shuffle: bool = F(True, "shuffle prompts each epoch (seeded)")


@dataclass
class RolloutConfig:
    prompts_per_step: int = F(4, "prompts per rollout step (over all processes)")
    samples_per_prompt: int = F(8, "responses sampled per prompt (a group)")
    max_new_tokens: int = F(1024, "tokens per response at most")
    min_new_tokens: int = F(0, "EOS is suppressed before this many tokens")
    temperature: float = F(1.0, "sampling temperature (§2.5: 1.0)")
    top_p: float = F(0.9, "nucleus sampling (§2.5: 0.9)")
    top_k: int = F(0, "top-k sampling; 0 = off")
    max_cache_gb: float = F(24.0, "KV-cache budget of one sampling call in GB (1e9 bytes); rows are sampled in "
                                  "chunks that fit; 0 = no limit (opdkit extension)")
    static_decode: bool = F(False, "decode with a static-shape step: a CUDA graph on CUDA (1.5-2x faster sampling "
                                   "measured on an H200), torch.compile on CPU (1.05-1.5x measured on 2 cores; "
                                   "a compile of 8-15 s per new shape); prompts padded to a multiple of 32 tokens "
                                   "while decoding; finished rows leave a CUDA-graph batch in halving buckets, "
                                   "a compiled CPU batch keeps them (opdkit extension)")
    reward: str = F("math", "verifier for the training solve rate: math, chain, none")


@dataclass
class LossConfig:
    name: str = F("opd", "base loss: opd (sampled-token, §2.1), lsm (§2.2), fkl, rkl, jsd (top-K §2.3), "
                         "opd_tis (opdkit extension, §8: sampled-token OPD with the per-token truncated IS "
                         "weight min(π/π_old, loss.tis_cap) instead of the PPO clip, as verl's rollout "
                         "correction)")
    clip_eps: float = F(0.2, "PPO clip ε of opd")
    dual_clip: float = F(3.0, "dual-clip constant c of opd (<= 0 disables)")
    topk: int = F(32, "teacher top-K support size for lsm / fkl / rkl / jsd")
    jsd_beta: float = F(0.5, "β of the generalized JSD (0 = forward KL, 1 = reverse KL)")
    tail: bool = F(True, "top-K divergences: keep the remaining mass as one tail bucket (else renormalize)")
    reduction: str = F("token-mean", "token-mean, seq-mean-token-mean, seq-mean-token-sum, constant")
    reduction_constant: float = F(0.0, "divisor of reduction 'constant' (e.g. max_new_tokens)")
    special_tokens: list = F([], "mask the first occurrence of each of these tokens per response (§2.4; "
                                 "paper: ['<', 'think', '<|im_end|>'])")
    advantage: str = F("plain", "advantage of opd / opd_tis: plain (log q − log π_old), sign_gated (SG-OPD §5.1), "
                                "recompute (opdkit extension, §8, after AsyncOPD: log q − log π_current, "
                                "recomputed at every update of a reused rollout batch)")
    tis_cap: float = F(2.0, "opd_tis: the truncation C of the per-token importance ratio π/π_old (opdkit "
                            "extension, §8; verl's default threshold 2)")


@dataclass
class SGConfig:
    lam: float = F(1.8, "SG-OPD λ: advantage scale where teacher and verifier agree in sign (§5.1)")
    beta: float = F(1.0, "SG-OPD β: interpolation toward the verifier advantage where they disagree")
    baseline: str = F("group_mean", "verifier advantage baseline: group_mean (R − mean of its group) or none")
    phase_steps: int = F(-1, "rollout steps of phased teacher sampling (§5.2); -1 = 20% of train.train_steps "
                             "when loss.advantage = sign_gated, else 0")
    teacher_samples_per_prompt: int = F(2, "teacher responses sampled per prompt during the phase")
    alpha: float = F(1.0, "initial weight of the token-mean NLL on endorsed teacher responses (decays "
                          "linearly to 0 at the end of the phase)")


@dataclass
class GateConfig:
    name: str = F("none", "drift gate segmentation: none, block, newline (§4), and the controls token (one "
                          "block per token) and sequence (one block per response), opdkit extensions")
    block_size: int = F(64, "tokens per block for gate 'block'")
    tau: float = F(1.0, "gate temperature τ in exp(−τ|s_b|)")
    normalize: str = F("batch", "gate mean-normalization: batch (over the optimizer-step batch, §4), sequence "
                                "(per response), none (opdkit extension, §8: the raw gate g <= 1 multiplies "
                                "the loss, so an update in which every block drifts shrinks)")
    statistic: str = F("signed_mean", "block drift score s_b: signed_mean (mean of lp − lp_old, §4) or "
                                      "abs_mean (opdkit extension, §8: mean of |lp − lp_old|, so drifts of "
                                      "opposite sign do not cancel)")
    newline_min_len: int = F(16, "newline spans shorter than this many tokens merge into the next")
    newline_max_len: int = F(128, "newline spans longer than this many tokens split into equal parts")
    newline_fallback: int = F(64, "block size for responses without a newline")


@dataclass
class TeacherConfig:
    context: str = F("", "the teacher's prompt (opdkit extension; teacher context, §8): a preset "
                         "(solution, answer, hint) or a template using {problem}, {answer}, {solution}, {hint} "
                         "(other braces literal), wrapped like the student's prompt; empty: the student's prompt. "
                         "{solution} / {hint} need rows with a 'solution' field (MATH500, chainK; not dapo17k)")
    hint_lines: int = F(2, "lines of the solution that {hint} holds (its first non-empty lines)")


@dataclass
class OptimConfig:
    lr: float = F(2e-6, "AdamW learning rate")
    weight_decay: float = F(0.0, "AdamW weight decay")
    beta1: float = F(0.9, "AdamW β1")
    beta2: float = F(0.999, "AdamW β2")
    eps: float = F(1e-8, "AdamW ε")
    warmup_updates: int = F(0, "optimizer updates of linear warm-up")
    schedule: str = F("constant", "lr schedule after warm-up: constant, linear, cosine")
    max_grad_norm: float = F(1.0, "gradient norm clip; <= 0 disables")
    adamw: str = F("auto", "AdamW kernel: auto (fused on CUDA, like transformers' Trainer; torch's default on CPU, "
                           "where the miniature's figures were measured), fused (also on CPU: 1.6-1.8 ms against "
                           "5.5-5.9 ms per step for the bench student), torch_default")


@dataclass
class TrainConfig:
    train_steps: int = F(200, "rollout steps (each samples a new rollout batch)")
    rollout_passes: int = F(2, "passes over each rollout batch (rollout reuse, §1)")
    minibatches_per_pass: int = F(1, "optimizer updates per pass (the batch is split in this many)")
    microbatch_size: int = F(8, "sequences per forward/backward (memory only; the update does not "
                                "depend on it)")
    teacher_microbatch_size: int = F(8, "sequences per teacher scoring forward")
    logprob_chunk_size: int = F(1024, "positions per chunk of the LM-head log-prob computation")
    seed: int = F(0, "seed of data order, sampling and initialisation")
    output_dir: str = F("runs/opd", "run directory (metrics.jsonl, checkpoints, final model)")
    save_every_steps: int = F(50, "rollout steps between checkpoints; 0 = only the final model")
    keep_checkpoints: int = F(2, "complete checkpoints kept on disk")
    max_bad_updates: int = F(3, "stop after this many non-finite updates in a row")
    stop_on_divergence: bool = F(True, "stop with a clear message when the run diverges without NaN (the "
                                       "gradient norm exactly 0 for several updates, or the loss / sampled "
                                       "reverse KL jumping over its running mean); off: warn and go on")
    divergence_factor: float = F(10.0, "a loss or sampled reverse KL above this many times its running mean "
                                       "(and 1 nat/token above it) counts as a divergence")
    divergence_zero_grad_updates: int = F(3, "updates in a row with a gradient norm of exactly 0 that count "
                                             "as a divergence; 0 disables this check")
    device: str = F("auto", "auto, cpu, cuda")
    autocast: str = F("auto", "bf16 autocast of every forward, float32 master weights (and a bf16 sampling copy): "
                              "auto (on CUDA only), bf16 (also on CPU), off")
    behaviour_logprobs: str = F("auto", "where the behaviour log-probs log π_old come from: recompute (from the "
                                        "training forward, so the first update's drift is exactly 0: the first "
                                        "update's rows take the values of that update's own forward, no extra "
                                        "forward for them; the first pass's other rows, and with SG-OPD all rows, "
                                        "one no-grad forward before the first update), sampler (recorded while "
                                        "sampling), auto (recompute whenever train.autocast is on: by default on "
                                        "CUDA, not on CPU); opdkit extension")
    threads: int = F(0, "torch CPU threads; 0 = torch's default")
    tensorboard: bool = F(False, "also log to TensorBoard (needs `tensorboard`)")
    wandb_project: str = F("", "also log to this W&B project (needs `wandb`)")
    progress: bool = F(True, "show a progress bar")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    sg: SGConfig = field(default_factory=SGConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


#: model.teacher values that make the student its own teacher (resolved in :mod:`opdkit.train.setup`).
SELF_TEACHERS = ("self", "self-current")

# Valid names: from the registries where there is one (a new loss or gate needs no edit here).
CHOICES = {
    "model.dtype": DTYPE_CHOICES,
    "model.teacher_dtype": DTYPE_CHOICES,
    "model.attn_implementation": ATTN_CHOICES,
    "data.chat_template": CHAT_TEMPLATE_CHOICES,
    "rollout.reward": REWARD_CHOICES,
    "loss.name": tuple(BASE_LOSSES),
    "loss.reduction": REDUCTION_MODES,
    "loss.advantage": tuple(ADVANTAGES),
    "gate.name": tuple(SEGMENTERS),
    "gate.normalize": tuple(GATE_NORMALIZATIONS),
    "gate.statistic": tuple(BLOCK_STATISTICS),
    "sg.baseline": ("group_mean", "none"),
    "optim.schedule": ("constant", "linear", "cosine"),
    "optim.adamw": tuple(ADAMW),
    "train.device": DEVICE_CHOICES,
    "train.behaviour_logprobs": tuple(BEHAVIOUR_LOGPROBS),
    "train.autocast": tuple(AUTOCAST),
}
POSITIVE = ["rollout.prompts_per_step", "rollout.samples_per_prompt", "rollout.max_new_tokens",
            "rollout.temperature", "loss.topk", "loss.tis_cap", "gate.block_size", "gate.newline_fallback",
            "gate.newline_max_len", "teacher.hint_lines", "optim.lr", "train.train_steps", "train.rollout_passes",
            "train.minibatches_per_pass", "train.microbatch_size", "train.teacher_microbatch_size",
            "train.logprob_chunk_size", "train.max_bad_updates", "train.keep_checkpoints", "train.divergence_factor"]
NONNEGATIVE = ["rollout.min_new_tokens", "rollout.top_k", "rollout.max_cache_gb", "model.lora_r", "gate.tau",
               "gate.newline_min_len", "optim.weight_decay", "optim.warmup_updates", "train.save_every_steps",
               "train.threads", "loss.clip_eps", "sg.beta", "sg.alpha", "sg.lam", "train.divergence_zero_grad_updates"]


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, *, need_models: bool = True) -> Config:
    """Check every value; raise :class:`ConfigError` naming the field and what would be valid."""
    if isinstance(cfg.data.chat_template, bool):
        cfg.data.chat_template = chat_setting(cfg.data.chat_template)
    for key, options in CHOICES.items():
        if _get(cfg, key) not in options:
            raise ConfigError(f"{key} = {_get(cfg, key)!r} is not valid; choose one of {', '.join(options)}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} = {_get(cfg, key)!r} must be > 0")
    for key in NONNEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} = {_get(cfg, key)!r} must be >= 0")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p = {cfg.rollout.top_p} must be in (0, 1]")
    if cfg.rollout.min_new_tokens > cfg.rollout.max_new_tokens:
        raise ConfigError("rollout.min_new_tokens must be <= rollout.max_new_tokens")
    if not 0.0 <= cfg.loss.jsd_beta <= 1.0:
        raise ConfigError(f"loss.jsd_beta = {cfg.loss.jsd_beta} must be in [0, 1]")
    if cfg.loss.reduction == "constant" and cfg.loss.reduction_constant <= 0:
        raise ConfigError("loss.reduction = constant needs loss.reduction_constant > 0 (e.g. max_new_tokens)")
    if cfg.loss.advantage != "plain" and not BASE_LOSSES[cfg.loss.name].uses_advantage:
        takes = ", ".join(n for n, spec in BASE_LOSSES.items() if spec.uses_advantage)
        raise ConfigError(f"loss.advantage = {cfg.loss.advantage} needs a loss that reads the advantage "
                          f"(loss.name: {takes}); loss.name = {cfg.loss.name} does not")
    if cfg.loss.advantage == "sign_gated" and cfg.rollout.reward == "none":
        raise ConfigError("loss.advantage = sign_gated needs a rollout.reward verifier (e.g. math, chain)")
    if cfg.sg.phase_steps < -1 or cfg.sg.teacher_samples_per_prompt < 1:
        raise ConfigError("sg.phase_steps must be >= -1 (-1 = auto) and sg.teacher_samples_per_prompt >= 1")
    if phase_steps(cfg) > 0 and cfg.rollout.reward == "none":
        raise ConfigError("sg.phase_steps > 0 needs a rollout.reward verifier to endorse teacher responses")
    rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    if rows % cfg.train.minibatches_per_pass:
        raise ConfigError(f"train.minibatches_per_pass = {cfg.train.minibatches_per_pass} must divide the "
                          f"rollout batch of {rows} sequences (prompts_per_step x samples_per_prompt)")
    if cfg.gate.name == "sequence" and cfg.gate.normalize == "sequence":
        raise ConfigError("gate.name = sequence with gate.normalize = sequence weights every token 1 (one block "
                          "per response, divided by its own mean): use gate.normalize = batch or none")
    if cfg.gate.newline_min_len > cfg.gate.newline_max_len:
        raise ConfigError("gate.newline_min_len must be <= gate.newline_max_len")
    _validate_teacher(cfg)
    if need_models:
        for key in ("model.student", "model.teacher"):
            if not _get(cfg, key):
                raise ConfigError(f"{key} is required: a save_pretrained directory or a hub id")
        if not (cfg.data.train_file or cfg.data.hf_dataset):
            raise ConfigError("data.train_file (a .jsonl path or registered name) or data.hf_dataset is required")
    return cfg


def _validate_teacher(cfg: Config) -> None:
    """A self-teacher needs a context; a context must be a preset or use a field (see :class:`TeacherConfig`)."""
    ctx = cfg.teacher.context
    if cfg.model.teacher in SELF_TEACHERS and not ctx:
        raise ConfigError(f"model.teacher = {cfg.model.teacher} needs teacher.context (e.g. teacher.context=solution): "
                          "under the student's own prompt the self-teacher is the student and every advantage is 0")
    if ctx and ctx not in CONTEXT_PRESETS:
        try:
            resolve_context(ctx, chain=False)
        except ValueError as e:
            raise ConfigError(f"teacher.context: {e}") from None


def phase_steps(cfg: Config) -> int:
    """Resolved number of phased-teacher-sampling rollout steps (§5.2)."""
    if cfg.sg.phase_steps >= 0:
        return cfg.sg.phase_steps
    return round(0.2 * cfg.train.train_steps) if cfg.loss.advantage == "sign_gated" else 0


#: Configs shipped inside the package (``paper/opd.yaml``, ...): ``--config paper/opd`` finds them anywhere.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped opdkit trainer configs, e.g. ``paper/opd``. ``verl/`` holds Hydra configs for
    verl's own trainer (README "At scale on verl"), not opdkit configs, so it is not listed."""
    return sorted(str(p.relative_to(SHIPPED_CONFIGS).with_suffix("")) for p in SHIPPED_CONFIGS.rglob("*.yaml")
                  if p.relative_to(SHIPPED_CONFIGS).parts[0] != "verl")


def resolve_config_path(path: str | Path) -> Path:
    """A config file: the path itself when it exists, else a shipped config by name (``paper/opd`` or
    ``paper/opd.yaml``, also ``configs/paper/opd.yaml`` as the README writes it)."""
    p = Path(path)
    if p.is_file():
        return p
    name = str(path).removeprefix("configs/").removesuffix(".yaml")
    shipped = SHIPPED_CONFIGS / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file {str(p)!r} not found; shipped configs: {', '.join(shipped_configs())}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                need_models: bool = True) -> Config:
    """Defaults <- YAML file <- overrides, then :func:`validate`."""
    cfg = Config()
    if path:
        p = resolve_config_path(path)
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        apply_mapping(cfg, data)
    if overrides:
        apply_mapping(cfg, parse_overrides(overrides))
    return validate(cfg, need_models=need_models)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_help(cfg_cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field, for ``--help``."""
    return _field_help(cfg_cls, prefix)
