"""The CPU miniature: presets, collapse counting, and `opdkit demo --quick` end to end (slow)."""

import json
import time

import pytest

from opdkit.cli.main import main
from opdkit.demo.presets import PRESETS, SIX, VARIANTS
from opdkit.demo.runner import collapse_summary, shipped_models


def test_presets_validate_as_trainer_configs():
    from opdkit.config import load_config

    for preset in PRESETS.values():
        for name in preset.variants:
            cfg = load_config(None, [*preset.train, *VARIANTS[name][1]], need_models=False)
            assert cfg.train.rollout_passes >= 2  # rollout reuse: drift exists
    assert set(SIX) <= set(PRESETS["default"].variants)


def test_collapse_is_half_the_base_mean(tmp_path):
    def run(name, mean):
        d = tmp_path / name
        (d / "eval").mkdir(parents=True)
        (d / "eval" / "results.json").write_text(json.dumps({"mean": {"pass@8": mean}}))
        return d

    runs = {"base": run("base", 0.4), "teacher": run("teacher", 0.9), "opd-seed0": run("a", 0.5),
            "opd-seed1": run("b", 0.19), "lsm-seed0": run("c", 0.21)}
    s = collapse_summary(runs)
    assert s["threshold"] == 0.2
    assert s["variants"]["opd"] == {"runs": 2, "collapsed": 1, "means": [0.5, 0.19]}
    assert s["variants"]["lsm"]["collapsed"] == 0


def test_shipped_checkpoints_exist_and_load():
    from opdkit.models import load_model, load_tokenizer

    student, teacher = shipped_models()
    for d in (student, teacher):
        assert load_model(d, device="cpu") is not None and len(load_tokenizer(d)) > 40


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    t0 = time.time()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    wall = time.time() - t0
    out = capsys.readouterr().out
    assert "pass@8 (%)" in out and "base student" in out and "LSM+NewlineSpan" in out
    for f in ("report.md", "report.csv", "bars.png", "passk.png", "training.png", "collapse.json"):
        assert (tmp_path / "report" / f).is_file(), f
    assert wall < 300, f"--quick took {wall:.0f} s"
