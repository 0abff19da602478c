"""The CPU miniature: presets, collapse counting, and `opdkit demo --quick` end to end (slow)."""

import json

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


def test_reuse_preset_sits_between_default_and_fragile_and_runs_the_controls():
    from opdkit.config import load_config

    def cfg(preset, name="opd"):
        return load_config(None, [*PRESETS[preset].train, *VARIANTS[name][1]], need_models=False)

    d, r, f = cfg("default"), cfg("reuse"), cfg("fragile")
    assert d.train.rollout_passes <= r.train.rollout_passes <= f.train.rollout_passes
    assert d.optim.lr <= r.optim.lr < f.optim.lr
    assert (r.train.rollout_passes, r.optim.lr) != (d.train.rollout_passes, d.optim.lr)  # more reuse
    assert r.train.train_steps == d.train.train_steps  # the same budget of rollouts
    assert PRESETS["reuse"].eval_problems >= 128  # a 3-seed table (issue #13 item 3)
    got = {n: cfg("reuse", n) for n in PRESETS["reuse"].variants}
    assert {"opd", "opd_block", "opd_newline"} <= set(got)
    settings = {(c.loss.name, c.loss.advantage, c.gate.name, c.gate.normalize, c.gate.statistic)
                for c in got.values()}
    for want in [("opd", "recompute", "none", "batch", "signed_mean"), ("opd_tis", "plain", "none", "batch",
                 "signed_mean"), ("opd", "plain", "sequence", "batch", "signed_mean"),
                 ("opd", "plain", "block", "none", "signed_mean"), ("opd", "plain", "block", "batch", "abs_mean")]:
        assert want in settings, want
    for name, c in got.items():  # every option that is not the paper's is labelled so
        paper = c.loss.name == "opd" and c.loss.advantage == "plain" and c.gate.name in ("none", "block", "newline") \
            and c.gate.normalize == "batch" and c.gate.statistic == "signed_mean"
        assert ("(opdkit ext.)" in VARIANTS[name][0]) == (not paper), name


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
    from opdkit.runtime.models import load_model, load_tokenizer

    student, teacher = shipped_models()
    for d in (student, teacher):
        assert load_model(d, device="cpu") is not None and len(load_tokenizer(d)) > 40


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pass@8 (%)" in out and "base student" in out and "LSM+NewlineSpan" in out
    assert " ± " in out  # standard errors next to the means
    for f in ("report.md", "report.csv", "bars.png", "passk.png", "training.png", "collapse.json", "traces.md",
              "training.md", "table.md"):
        assert (tmp_path / "report" / f).is_file(), f
    assert "| base student | 1 |" in (tmp_path / "report" / "traces.md").read_text()
    assert "| OPD-seed0 |" in (tmp_path / "report" / "training.md").read_text()
    # (its wall time is a benchmark figure, in the README, not a test: CI machines may be busy)


def test_trace_errors_classifies_step_counts_and_prefixes():
    from opdkit.tasks.chain import solve, trace_errors

    problem = "37 c+5 a-7 b*3"
    ref = solve(problem)  # 37 c+5=42 / 42 b*3=26 / 26 a-7=19 / answer: 19
    assert trace_errors(problem, ref) == {"k": 3, "steps": 3, "correct_prefix": 3, "kind": "exact",
                                          "reference": True}
    assert trace_errors(problem, "\n" + ref + "\n")["reference"]  # surrounding whitespace is not a slip
    lines = ref.split("\n")
    short = "\n".join(lines[:2] + ["answer: 26"])
    assert trace_errors(problem, short) == {"k": 3, "steps": 2, "correct_prefix": 2, "kind": "short",
                                            "reference": False}
    long = "\n".join(lines[:3] + ["19 d+2=21", "answer: 21"])
    assert trace_errors(problem, long) == {"k": 3, "steps": 4, "correct_prefix": 3, "kind": "long",
                                           "reference": False}
    slip = "\n".join([lines[0], "42 b*3=27", "27 a-7=20", "answer: 20"])
    assert trace_errors(problem, slip) == {"k": 3, "steps": 3, "correct_prefix": 1, "kind": "exact",
                                           "reference": False}
    # a wrong trace that ends on the right answer is not the reference trace
    lucky = "\n".join([lines[0], "42 b*3=27", "27 a-7=19", "answer: 19"])
    assert not trace_errors(problem, lucky)["reference"]
    assert not trace_errors(problem, "\n".join(lines[:3] + ["answer: 20"]))["reference"]
    assert trace_errors(problem, "garbage")["kind"] == "short"


def test_traces_table_averages_seeds(tmp_path):
    from opdkit.demo.traces import traces_table
    from opdkit.tasks.chain import make_benchmark, solve

    rows = make_benchmark(8)[:2]

    def run(name, responses):
        d = tmp_path / name / "eval"
        d.mkdir(parents=True)
        with open(d / "samples.jsonl", "w") as f:
            for r, resp in zip(rows, responses):
                f.write(json.dumps({"benchmark": "chain8", "id": r["id"], "response": resp,
                                    "reward": int(resp == solve(r["problem"]))}) + "\n")
        return tmp_path / name

    good = [solve(r["problem"]) for r in rows]
    short = ["\n".join(g.split("\n")[:3]) for g in good]
    runs = {"base": run("base", [good[0], short[1]]), "opd-seed0": run("s0", good), "opd-seed1": run("s1", short)}
    md, stats = traces_table(runs, {"base": "base student", "opd": "OPD"})
    ids = [r["id"] for r in rows]
    assert stats["per_run"]["base"] == {"n": 2, "short": 0.5, "exact": 0.5, "long": 0.0,
                                        "prefix_frac": (1 + 3 / 8) / 2, "correct": 0.5, "reference": 0.5,
                                        "chance": 0.0, "problems": {"chain8": {ids[0]: [1, 1], ids[1]: [1, 0]}}}
    opd = stats["per_variant"]["opd"]
    assert opd["runs"] == 2 and opd["short"] == 0.5 and opd["correct"] == 0.5 and opd["reference"] == 0.5
    assert "| OPD | 2 | 50.0 | 50.0 | 0.0 |" in md and "| base student | 1 |" in md


def test_traces_count_right_answers_from_wrong_traces(tmp_path):
    from opdkit.demo.traces import trace_stats
    from opdkit.tasks.chain import make_benchmark, solve

    row = make_benchmark(8)[0]
    ref = solve(row["problem"]).split("\n")
    lucky = "\n".join([ref[0], ref[1][:-2] + "00", *ref[2:]])  # a wrong result on line 2, the right answer
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"benchmark": "chain8", "id": row["id"], "response": resp, "reward": 1})
                            + "\n" for resp in ("\n".join(ref), lucky)))
    s = trace_stats(path)
    assert s["correct"] == 1.0 and s["reference"] == 0.5 and s["chance"] == 0.5


def test_strict_table_is_pass_at_k_over_reference_traces():
    # brute force: the fraction of k-subsets of a problem's samples that hold a reference trace
    import itertools
    import statistics

    from opdkit.demo.traces import strict_table

    n, k = 5, 2
    refs = {"base": {"p0": [1, 0, 0, 0, 0], "p1": [0, 0, 0, 0, 0], "p2": [1, 1, 0, 1, 0]},
            "opd-seed0": {"p0": [1, 1, 1, 1, 1], "p1": [0, 0, 0, 1, 0], "p2": [0, 0, 0, 0, 0]},
            "opd-seed1": {"p0": [0, 1, 0, 0, 0], "p1": [1, 1, 0, 0, 0], "p2": [0, 0, 1, 0, 0]}}

    def brute(flags):
        subsets = list(itertools.combinations(flags, k))
        return sum(any(s) for s in subsets) / len(subsets)

    per_run = {key: {"problems": {"chain8": {p: [n, sum(f)] for p, f in probs.items()}}} for key, probs in refs.items()}
    md, cells = strict_table(per_run, {"base": "base student", "opd": "OPD"}, k)
    want = {key: statistics.fmean(brute(f) for f in probs.values()) for key, probs in refs.items()}
    base_vals = [brute(f) for f in refs["base"].values()]
    assert abs(cells["base"]["chain8"][0] - want["base"]) < 1e-12
    assert abs(cells["base"]["chain8"][1] - statistics.stdev(base_vals) / 3 ** 0.5) < 1e-12  # one run: over problems
    seeds = [want["opd-seed0"], want["opd-seed1"]]
    assert abs(cells["opd"]["mean"][0] - statistics.fmean(seeds)) < 1e-12
    assert abs(cells["opd"]["mean"][1] - statistics.stdev(seeds) / 2 ** 0.5) < 1e-12  # several seeds: over seeds
    assert "| OPD | 2 |" in md and "| base student | 1 |" in md


def test_run_all_resume_keeps_finished_jobs(tmp_path, monkeypatch):
    import opdkit.demo.runner as runner
    from opdkit.demo.presets import get_preset

    preset = get_preset("quick")
    keys = ["base-seed0", "base-seed1", "teacher"] + [f"{v}-seed{s}" for v in preset.variants for s in (0, 1)]
    for k in keys:
        (tmp_path / "runs" / k / "eval").mkdir(parents=True)
        (tmp_path / "runs" / k / "eval" / "results.json").write_text("{}")

    def boom(*a, **k):
        raise AssertionError("a finished job was run again")

    monkeypatch.setattr(runner, "train_job", boom)
    monkeypatch.setattr(runner, "reference_job", boom)
    done = runner.run_all(preset, out=tmp_path, seeds=2, student=tmp_path, teacher=tmp_path, data=tmp_path,
                          resume=True, print_fn=lambda *a: None)
    assert sorted(done) == sorted(keys)
    for gone in ("opd-seed0", "base-seed1"):
        (tmp_path / "runs" / gone / "eval" / "results.json").unlink()
        with pytest.raises(AssertionError, match="run again"):
            runner.run_all(preset, out=tmp_path, seeds=2, student=tmp_path, teacher=tmp_path, data=tmp_path,
                           resume=True, print_fn=lambda *a: None)
        (tmp_path / "runs" / gone / "eval" / "results.json").write_text("{}")


def test_base_student_is_evaluated_with_each_variant_seeds_evaluation_seed(tmp_path, monkeypatch):
    """Variant seed s is evaluated with evaluation seed s, and so is one base-student run per seed: each trained
    run has a paired base; the teacher is evaluated once. The commands say which seed and label."""
    import opdkit.demo.runner as runner
    from opdkit.demo.presets import get_preset

    preset = get_preset("quick")
    calls = []
    monkeypatch.setattr(runner, "_run", lambda cmd, log: calls.append(cmd))
    monkeypatch.setattr(runner, "train_job", lambda name, seed, *a: calls.append(["train", name, seed]) or tmp_path)
    done = runner.run_all(preset, out=tmp_path, seeds=3, jobs=1, variants=["opd"], student=tmp_path / "s",
                          teacher=tmp_path / "t", data=tmp_path, print_fn=lambda *a: None)
    assert sorted(done) == ["base-seed0", "base-seed1", "base-seed2", "opd-seed0", "opd-seed1", "opd-seed2",
                            "teacher"]
    evals = {(c[c.index("--model") + 1], c[c.index("--seed") + 1], c[c.index("--label") + 1])
             for c in calls if "eval" in c}
    assert evals == {(str(tmp_path / "s"), str(s), f"base student-seed{s}") for s in range(3)} | {
        (str(tmp_path / "t"), "0", "teacher")}
    calls.clear()  # and a trained run is evaluated with its training seed
    monkeypatch.undo()
    monkeypatch.setattr(runner, "_run", lambda cmd, log: calls.append(cmd))
    runner.train_job("opd", 2, preset, tmp_path / "s", tmp_path / "t", tmp_path, tmp_path)
    train_cmd, eval_cmd = calls
    assert "train.seed=2" in train_cmd and eval_cmd[eval_cmd.index("--seed") + 1] == "2"


def test_demo_set_rejects_an_invalid_override_before_any_job(tmp_path):
    with pytest.raises(SystemExit, match="must be > 0"):
        main(["demo", "--quick", "--set", "optim.lr=-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["demo", "--quick", "--set", "optim.lr", "--out", str(tmp_path)])
    assert not (tmp_path / "runs").exists()


def test_training_summary_first_last_and_drift_peak(tmp_path):
    from opdkit.demo.traces import training_summary, training_table

    run = tmp_path / "opd-seed0"
    run.mkdir()
    rows = [{"kind": "update", "step": 0, "drift_abs_mean": 9.0}]
    rows += [{"kind": "step", "step": i, "sampled_rkl": 0.1 * i, "drift_abs_mean": 0.01 * (i == 6) + 0.001,
              "gate_min": 1.0, "solve_rate": 0.5, "stop_length": 0.0} for i in range(10)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = training_summary(run / "metrics.jsonl", window=5)
    assert s["steps"] == 10
    assert s["sampled_rkl"]["first"] == pytest.approx(0.2) and s["sampled_rkl"]["last"] == pytest.approx(0.7)
    assert s["drift_peak"] == {"value": pytest.approx(0.011), "step": 6}  # update rows are not steps
    md, _ = training_table({"opd-seed0": run, "base": tmp_path / "nothing"}, {"opd": "OPD"})
    assert "| OPD-seed0 | 0.200 → 0.700 |" in md and "base" not in md


def test_resume_refuses_a_finished_job_with_other_settings(tmp_path):
    import yaml

    import opdkit.demo.runner as runner
    from opdkit.demo.presets import get_preset

    quick = get_preset("quick")
    run = tmp_path / "runs" / "opd-seed0"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text("{}")
    (run / "job.yaml").write_text(yaml.safe_dump({"settings": runner.job_settings("opd", quick)}))
    assert runner._finished(tmp_path, "opd-seed0", "opd", quick) == run
    with pytest.raises(ValueError, match="other settings"):
        runner._finished(tmp_path, "opd-seed0", "opd", get_preset("fragile"))


def test_demo_refuses_an_earlier_runs_out_without_resume_or_overwrite(tmp_path):
    (tmp_path / "runs" / "opd-seed0").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--resume keeps the finished ones, --overwrite deletes them"):
        main(["demo", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="pass one"):
        main(["demo", "--quick", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert (tmp_path / "runs" / "opd-seed0").is_dir()


def _record(label, per_bench):
    """A RunRecord with per-problem (n, c) counts: ``{bench: [c, ...]}`` at n = 8."""
    from pathlib import Path

    from opdkit.eval.runs import RunRecord

    return RunRecord(label, Path("."), {"benchmarks": {b: {"per_problem": [{"n": 8, "c": c} for c in cs]}
                                                       for b, cs in per_bench.items()}})


def test_se_table_one_run_se_over_problems_and_seeds_se_over_seeds():
    import math
    import statistics

    from opdkit.demo.tables import se_table

    base = _record("base", {"x": [0, 8, 4, 0], "y": [8, 8, 0, 0]})
    seeds = [_record(f"opd-seed{s}", {"x": [s, 8, 8, 0], "y": [8, 8, 8, s]}) for s in range(3)]
    header, rows = se_table([base, *seeds], "pass@1")
    assert header == ["run", "seeds", "x", "y", "mean"]
    by = {r[0]: r for r in rows}
    # one run: SE over problems of the per-problem pass@1 = c / n, ddof = 1
    px, py = [0, 1, 0.5, 0], [1, 1, 0, 0]
    se_x, se_y = (statistics.stdev(v) / 2 for v in (px, py))
    assert by["base"][1] == "1" and by["base"][2] == f"{100 * statistics.fmean(px):.1f} ± {100 * se_x:.1f}"
    assert by["base"][4] == f"{100 * (statistics.fmean(px) + statistics.fmean(py)) / 2:.1f} ± " \
                            f"{100 * math.sqrt(se_x ** 2 + se_y ** 2) / 2:.1f}"
    # seeds: mean over seeds and SE = std / sqrt(seeds) of the seeds' values
    xs = [(s / 8 + 2) / 4 for s in range(3)]
    assert by["opd"][1] == "3" and by["opd"][2] == f"{100 * statistics.fmean(xs):.1f} ± " \
                                                   f"{100 * statistics.stdev(xs) / math.sqrt(3):.1f}"
