"""Tests for opdkit.runtime.problems / benchmarks: loaders, registry, data-dir resolution, error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from opdkit.runtime.benchmarks import BENCHMARKS, DATA_DIR_ENV, load_benchmark, resolve_data_dir
from opdkit.runtime.problems import DataError, Problem, load_hf_problems, load_jsonl_problems

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "math500.jsonl").is_file(),
    reason=f"benchmark data not found at {DATA_DIR} (expected ../shared/data next to the repo)",
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _write(path: Path, lines: list[str | dict]) -> Path:
    path.write_text(
        "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8"
    )
    return path


GOOD = {"id": "p1", "problem": "What is 1+1?", "answer": "2", "source": "toy"}


# --------------------------------------------------------------------------- real benchmarks


@needs_data
@pytest.mark.parametrize(("name", "rows"), [("aime24", 30), ("aime25", 30), ("math500", 500), ("amc23", 40)])
def test_load_registered_benchmarks(name, rows):
    problems = load_benchmark(name, data_dir=DATA_DIR)
    assert len(problems) == rows
    assert all(isinstance(p, Problem) for p in problems)
    assert all(isinstance(p.answer, str) and p.answer for p in problems)
    assert all(isinstance(p.problem, str) and p.problem for p in problems)
    assert len({p.id for p in problems}) == rows
    # same result through a path
    assert load_benchmark(DATA_DIR / BENCHMARKS[name]) == problems


@needs_data
def test_math500_extra_fields():
    p = load_benchmark("MATH500", data_dir=DATA_DIR)[0]
    assert p.id == "test/precalculus/807.json"
    assert p.source == "MATH-500"
    assert p.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert {"solution", "subject", "level", "unique_id"} <= set(p.extra)
    assert "problem" not in p.extra and "answer" not in p.extra and "id" not in p.extra


@needs_data
def test_dapo17k_loads():
    problems = load_benchmark("dapo17k", data_dir=DATA_DIR)
    assert len(problems) == 17_243
    assert all(p.answer.lstrip("-").isdigit() for p in problems)


# --------------------------------------------------------------------------- malformed rows


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "p3", "problem": "x", "answer": ', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ({"id": "p3", "problem": "x"}, "missing field 'answer'"),
        ({"id": "p3", "answer": "1"}, "missing field 'problem'"),
        ({"id": "", "problem": "x", "answer": "1"}, "must be a non-empty string or integer"),
        ({"id": "p3", "problem": 5, "answer": "1"}, "'problem' must be a string"),
        ({"id": "p3", "problem": "   ", "answer": "1"}, "'problem' is empty"),
        ({"id": "p3", "problem": "x", "answer": None}, "'answer' must be a string or number"),
        ({"id": "p3", "problem": "x", "answer": True}, "boolean"),
        ({"id": "p3", "problem": "x", "answer": ["1"]}, "'answer' must be a string or number"),
        ({"id": "p3", "problem": "x", "answer": ""}, "'answer' is empty"),
        ({"id": "p1", "problem": "x", "answer": "1"}, "duplicate id 'p1'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "id": "p2"}, bad_line, {**GOOD, "id": "p4"}])
    with pytest.raises(DataError) as info:
        load_jsonl_problems(path)
    text = str(info.value)
    assert f"{path}:3" in text, text
    assert message in text, text


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not valid UTF-8"):
        load_jsonl_problems(path)


def test_numbers_blank_lines_and_extras(tmp_path):
    path = _write(
        tmp_path / "nums.jsonl",
        [
            {"id": 1, "problem": "a", "answer": 27.0, "year": 2023},
            "",
            "   ",
            {"id": 2, "problem": "b", "answer": -1},
            {"id": 3, "problem": "c", "answer": 0.5, "source": None},
            {"id": 4, "problem": "d", "answer": "  \\frac{1}{2} "},
        ],
    )
    problems = load_jsonl_problems(path)
    assert [p.answer for p in problems] == ["27", "-1", "0.5", "\\frac{1}{2}"]
    assert [p.id for p in problems] == ["1", "2", "3", "4"]
    assert problems[0].extra == {"year": 2023}
    assert problems[2].source == ""


def test_custom_field_names_and_generated_ids(tmp_path):
    path = _write(tmp_path / "custom.jsonl", [{"question": "q1", "gt": 7}, {"question": "q2", "gt": "8"}])
    problems = load_jsonl_problems(path, problem_field="question", answer_field="gt", id_field=None)
    got = [(p.id, p.problem, p.answer) for p in problems]
    assert got == [("custom-1", "q1", "7"), ("custom-2", "q2", "8")]
    assert problems[0].extra == {}


# --------------------------------------------------------------------------- data dir resolution


def test_resolve_explicit_dir(tmp_path):
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="passed as data_dir"):
        resolve_data_dir(tmp_path / "missing")


def test_resolve_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    other = tmp_path / "explicit"
    other.mkdir()
    assert resolve_data_dir(other) == other.resolve()  # explicit argument wins
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        resolve_data_dir()


def test_env_var_used_by_load_benchmark(tmp_path, monkeypatch):
    _write(tmp_path / "amc23.jsonl", [GOOD])
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_benchmark("amc23") == [Problem("p1", "What is 1+1?", "2", "toy", {})]
    with pytest.raises(FileNotFoundError, match="aime24.jsonl"):
        load_benchmark("aime24")


def test_no_sibling_default_and_error_says_how_to_get_the_files(tmp_path, monkeypatch):
    # a ../shared/data next to the working directory is not looked at: only the option or the env var
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir()
    text = str(info.value)
    assert DATA_DIR_ENV in text and "--data-dir" in text
    assert "math500.jsonl" in text and "not ship" in text
    with pytest.raises(FileNotFoundError, match="not ship"):
        load_benchmark("math500")
    with pytest.raises(FileNotFoundError, match="not ship"):
        load_benchmark("math500", data_dir=tmp_path / "cwd")  # directory exists, file missing


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        load_benchmark("gsm8k")
    for name in BENCHMARKS:
        assert name in str(info.value)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such benchmark file"):
        load_benchmark(tmp_path / "nope.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_load_hf_problems_without_datasets():
    with pytest.raises(ImportError, match="pip install datasets"):
        load_hf_problems("HuggingFaceH4/MATH-500")
