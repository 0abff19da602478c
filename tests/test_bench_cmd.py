"""``opdkit bench step`` end to end on its random CPU workload, cut to a few tokens."""

import json

import pytest

from opdkit.cli.main import main


@pytest.mark.parametrize("teacher_dtype, attn", [("", ""), ("bfloat16", "eager")])
def test_bench_step_runs_and_reports_its_split(capsys, teacher_dtype, attn):
    argv = ["bench", "step", "--steps", "2", "--new-tokens", "4", "--prompts-per-step", "2", "--threads", "1",
            "--device", "cpu"] + (["--teacher-dtype", teacher_dtype] if teacher_dtype else []) + (
            ["--attn-implementation", attn] if attn else [])
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 2 and res["new_tokens"] == 4 and res["dtype"] == "float32"
    assert res["teacher_dtype"] == (teacher_dtype or "float32")
    assert res["attn_implementation"] == (attn or "sdpa")
    assert all(res[k] > 0 for k in ("sample_s", "teacher_s", "update_s", "generated_tokens_per_s"))


def test_bench_step_builds_the_teacher_in_its_own_dtype():
    import argparse

    import torch

    from opdkit.cli import bench_cmd

    args = argparse.Namespace(student="", teacher="", dtype="float32", teacher_dtype="bfloat16", seed=0)
    student, teacher = bench_cmd._models(args, torch.device("cpu"))
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}


def test_bench_step_builds_both_models_with_the_attention_asked_for():
    import argparse

    import torch

    from opdkit.cli import bench_cmd

    args = argparse.Namespace(student="", teacher="", dtype="float32", teacher_dtype="", seed=0,
                              attn_implementation="eager")
    student, teacher = bench_cmd._models(args, torch.device("cpu"))
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
