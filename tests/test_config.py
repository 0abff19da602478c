"""Config loading, validation messages, overrides, the resolved plan and the paper configs."""

import re
from pathlib import Path

import pytest

from opdkit.cli.main import main
from opdkit.config import ConfigError, load_config, parse_overrides
from opdkit.train.plan import check_world, resolve_plan

PAPER = sorted((Path(__file__).parents[1] / "src" / "opdkit" / "configs" / "paper").glob("*.yaml"))


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["loss.name=lsm", "train.train_steps=10"]) == {
        "loss": {"name": "lsm"}, "train": {"train_steps": "10"}}
    cfg = load_config(None, ["loss.name=lsm", "optim.lr=1e-5", "gate.name=block", "train.train_steps=10",
                             "loss.special_tokens=[a, b]", "data.prompt_template={problem} = ?",
                             "model.lora_target_modules=q_proj,v_proj"], need_models=False)
    assert cfg.loss.name == "lsm" and cfg.optim.lr == 1e-5 and cfg.gate.name == "block"
    assert cfg.train.train_steps == 10 and cfg.loss.special_tokens == ["a", "b"]
    assert cfg.data.prompt_template == "{problem} = ?" and cfg.model.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override, message", [
    ("loss.name=kl", "loss.name = 'kl' is not valid; choose one of opd, lsm"),
    ("gate.name=blocks", "choose one of none, token, block, newline, sequence"),
    ("train.rollout_passes=0", "train.rollout_passes = 0 must be > 0"),
    ("rollout.top_p=1.5", "rollout.top_p = 1.5 must be in (0, 1]"),
    ("train.minibatches_per_pass=3", "must divide the rollout batch of 32 sequences"),
    ("loss.nme=opd", "unknown field 'loss.nme'"),
    ("train.train_steps=ten", "train.train_steps = 'ten' has the wrong type"),
    ("loss.reduction=constant", "needs loss.reduction_constant > 0"),
    ("model.attn_implementation=flash", "model.attn_implementation = 'flash' is not valid; choose one of sdpa, eager"),
])
def test_invalid_values_name_the_field_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, [override], need_models=False)


@pytest.mark.parametrize("overrides, message", [
    (["gate.statistic=median"], "gate.statistic = 'median' is not valid; choose one of signed_mean, abs_mean"),
    (["gate.normalize=global"], "choose one of batch, sequence, none"),
    (["loss.tis_cap=0"], "loss.tis_cap = 0.0 must be > 0"),
    (["loss.advantage=recompute", "loss.name=lsm"], "needs a loss that reads the advantage (loss.name: opd, opd_tis)"),
    (["loss.advantage=sign_gated", "loss.name=jsd"], "needs a loss that reads the advantage"),
    (["loss.advantage=sign_gated", "rollout.reward=none"], "sign_gated needs a rollout.reward verifier"),
    (["gate.name=sequence", "gate.normalize=sequence"], "weights every token 1"),
])
def test_reuse_controls_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides, need_models=False)


def test_reuse_controls_load_and_choices_come_from_the_registries():
    """The §8 controls (opdkit extensions) load, are labelled so in their help, and derive their names."""
    from opdkit.config import CHOICES, field_help
    from opdkit.gates.drift import BLOCK_STATISTICS, GATE_NORMALIZATIONS
    from opdkit.train.sg_opd import ADVANTAGES

    cfg = load_config(None, ["loss.name=opd_tis", "loss.tis_cap=1.5", "loss.advantage=recompute",
                             "gate.name=sequence", "gate.normalize=none", "gate.statistic=abs_mean"],
                      need_models=False)
    assert (cfg.loss.name, cfg.loss.tis_cap, cfg.loss.advantage) == ("opd_tis", 1.5, "recompute")
    assert (cfg.gate.normalize, cfg.gate.statistic) == ("none", "abs_mean")
    assert CHOICES["gate.normalize"] == tuple(GATE_NORMALIZATIONS)
    assert CHOICES["gate.statistic"] == tuple(BLOCK_STATISTICS)
    assert CHOICES["loss.advantage"] == tuple(ADVANTAGES) == ("plain", "sign_gated", "recompute")
    helps = {name: text for name, _, text in field_help()}
    for key in ("loss.tis_cap", "loss.advantage", "loss.name", "gate.normalize", "gate.statistic"):
        assert "opdkit extension" in helps[key], key


def test_models_and_data_are_required_for_a_real_run():
    with pytest.raises(ConfigError, match="model.student is required"):
        load_config(None, [])


def test_plan_counts():
    cfg = load_config(None, ["train.minibatches_per_pass=2", "train.microbatch_size=3"], need_models=False)
    plan = resolve_plan(cfg, world_size=2)
    assert plan["sequences_per_rollout_step"] == 32
    assert plan["optimizer_updates_per_rollout_step"] == 4
    assert plan["sequences_per_update"] == 16
    assert plan["microbatches_per_update_per_process"] == 3  # 8 per process, 3 per micro-batch
    assert plan["total_optimizer_updates"] == 800
    with pytest.raises(ConfigError, match="rollout.prompts_per_step = 4 does not divide over 3 processes"):
        check_world(cfg, 3)


def test_plan_error_lists_the_prompts_per_step_that_work_for_the_process_count():
    """The paper config (4 prompts x 8 samples) on 8 processes, as a `torchrun --nproc_per_node 8` would."""
    cfg = load_config("paper/opd", need_models=False)
    check_world(cfg, 4)  # 1 prompt (8 sequences) per process
    with pytest.raises(ConfigError) as err:
        check_world(cfg, 8)
    msg = str(err.value)
    assert "On 8 processes use rollout.prompts_per_step = 8, 16, 24, 32" in msg
    assert "keep rollout.prompts_per_step = 4 and launch 1, 2 or 4 processes" in msg
    for n in (8, 16, 24, 32):  # each value offered works
        check_world(load_config("paper/opd", [f"rollout.prompts_per_step={n}"], need_models=False), 8)
    # the minibatch split is part of it: 2 prompts x 2 samples on 2 processes = 2 sequences, not 4 updates
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                             "train.minibatches_per_pass=4"], need_models=False)
    with pytest.raises(ConfigError, match="minibatches_per_pass = 4 must divide the 2 sequences each of the 2 "
                                          r"processes.*use rollout.prompts_per_step = 4, 8, 12, 16.*launch 1 process$"):
        check_world(cfg, 2)


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_validate_and_dry_run(path, capsys):
    cfg = load_config(path)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt, cfg.train.rollout_passes) == (4, 8, 2)
    assert (cfg.train.train_steps, cfg.optim.lr, cfg.loss.topk, cfg.rollout.top_p) == (200, 2e-6, 32, 0.9)
    assert cfg.rollout.max_new_tokens == 16384 and cfg.model.student == "Qwen/Qwen3-1.7B-Base"
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "total optimizer updates              400" in out


def test_six_paper_variants_and_sg_opd():
    cfgs = [load_config(p) for p in PAPER]
    plain = {(c.loss.name, c.gate.name) for c in cfgs if c.loss.advantage == "plain"}
    assert plain == {(l, g) for l in ("opd", "lsm") for g in ("none", "block", "newline")}
    sg = {(c.gate.name, c.sg.phase_steps, c.sg.lam) for c in cfgs if c.loss.advantage == "sign_gated"}
    assert sg == {("none", 40, 1.8), ("block", 40, 1.8)}


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--dry-run", "loss.name=nope"]) == 2
    assert "configuration error: loss.name" in capsys.readouterr().err
