"""Every shipped configs/verl/*.yaml composes with hydra (on verl 0.9.1's own ppo_trainer.yaml) into a valid verl
config: verl's dataclasses (actor, algorithm, distillation with opdkit's loss config) build from it, verl's
``validate_config`` accepts it, and opdkit's guards pass. ``opdkit verl-prepare`` writes parquet rows verl's
RLHFDataset reads, graded by the wired reward function."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# not importorskip("verl"): with tests/ on sys.path this folder itself imports as a namespace package "verl"
pytest.importorskip("verl.trainer.distillation.losses", reason="verl lane only (.ci/run stage verl)")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.ppo.utils import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass, validate_config  # noqa: E402
from verl.workers.config import DistillationConfig  # noqa: E402

from opdkit.integrations.verl import OpdkitDistillationLossConfig  # noqa: E402
from opdkit.integrations.verl.guards import check_actor_setting  # noqa: E402
from opdkit.tokenizer import DEFAULT_SPECIALS, char_tokenizer  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[2] / "src" / "opdkit" / "configs" / "verl"
VARIANTS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "opdkit_base")
EXPECTED = {  # file -> (loss_mode, gate)
    "opd": ("opdkit_opd", "none"), "opd_block64": ("opdkit_opd", "block"),
    "opd_newlinespan": ("opdkit_opd", "newline"), "lsm": ("opdkit_lsm", "none"),
    "lsm_block64": ("opdkit_lsm", "block"), "lsm_newlinespan": ("opdkit_lsm", "newline"),
    "sg_opd": ("opdkit_sg_opd", "none"), "sg_opd_block64": ("opdkit_sg_opd", "block"),
}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tokenizer folder standing in for the student (the YAMLs read token ids from the student's tokenizer);
    "think" is one token, as in Qwen3's vocabulary."""
    d = tmp_path_factory.mktemp("student")
    char_tokenizer(specials=DEFAULT_SPECIALS + ("think",)).save_pretrained(d)
    return d


def compose_variant(name: str, student_dir) -> OmegaConf:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=[
            f"actor_rollout_ref.model.path={student_dir}",
            "distillation.teacher_models.teacher_model.model_path=/models/teacher",
        ])


def test_every_variant_is_tested():
    assert VARIANTS == sorted(EXPECTED)


@pytest.mark.parametrize("name", VARIANTS)
def test_shipped_yaml_composes_into_a_valid_verl_config(name, student_dir):
    cfg = compose_variant(name, student_dir)
    OmegaConf.resolve(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    check_actor_setting(actor.strategy, actor.loss_agg_mode)
    omega_conf_to_dataclass(cfg.algorithm)
    dist = omega_conf_to_dataclass(cfg.distillation)
    assert isinstance(dist, DistillationConfig)
    lcfg = dist.distillation_loss
    assert isinstance(lcfg, OpdkitDistillationLossConfig)
    assert (lcfg.loss_mode, lcfg.gate) == EXPECTED[name]
    assert lcfg.loss_settings.use_topk == (lcfg.loss_mode == "opdkit_lsm")
    assert len(lcfg.special_token_ids) == 3  # "<", "think", "<|im_end|>" found in the student tokenizer
    if lcfg.gate == "newline":
        assert lcfg.newline_token_ids
    if lcfg.gate == "block":
        assert lcfg.block_size == 64
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_VENDOR == "opdkit"
    assert cfg.reward.custom_reward_function.path == "pkg://opdkit.integrations.verl.reward"
    assert (cfg.actor_rollout_ref.actor.ppo_epochs, cfg.actor_rollout_ref.rollout.n, cfg.data.train_batch_size) \
        == (2, 8, 4)
    if lcfg.loss_mode == "opdkit_sg_opd":
        assert (cfg.algorithm.adv_estimator, cfg.algorithm.norm_adv_by_std_in_grpo) == ("grpo", False)


def test_a_bad_override_is_refused(student_dir):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="opd_block64", overrides=[
            f"actor_rollout_ref.model.path={student_dir}", "distillation.teacher_models.teacher_model.model_path=/t",
            "distillation.distillation_loss.use_policy_gradient=true"])
    with pytest.raises(Exception, match="use_policy_gradient=false"):
        omega_conf_to_dataclass(cfg.distillation)


def test_prepared_parquet_reads_in_verl_and_grades(tmp_path):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from opdkit.integrations.verl.prepare import prepare
    from opdkit.integrations.verl.reward import compute_score
    from opdkit.runtime.benchmarks import DATA_DIR_ENV

    # as the other data tests: $OPDKIT_DATA_DIR, else the ../shared/data next to the repository
    data = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[3] / "shared" / "data")
    if not (data / "math500.jsonl").exists():
        pytest.skip(f"benchmark data not found at {data}")
    paths = prepare(tmp_path, ["math500", "dapo17k"], data_dir=str(data), limit=4)
    tok = char_tokenizer()
    ds = RLHFDataset(data_files=[str(paths["math500"])], tokenizer=tok,
                     config=OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": 4096,
                                              "filter_overlong_prompts": False, "return_raw_chat": True}))
    assert len(ds) == 4
    row = ds[0]
    assert row["raw_prompt"][0]["content"].endswith("put your final answer within \\boxed{}.")
    truth = row["reward_model"]["ground_truth"]
    assert compute_score("opdkit/math500", f"so \\boxed{{{truth}}}", truth)["score"] == 1.0
    assert compute_score("opdkit/math500", "so \\boxed{17.5}", truth)["score"] == 0.0
