"""Tests for ``opdkit report``: tables from fake eval dirs, seed grouping, CSV, PNGs, and the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from fractions import Fraction
from pathlib import Path

import pytest

from opdkit.cli.main import main
from opdkit.eval.report import (
    MISSING,
    ReportError,
    comparison_table,
    group_by_seed,
    load_run,
    seed_group_key,
    to_csv,
    to_markdown,
    write_report,
)

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _brute(n: int, c: int, k: int) -> Fraction:
    """Exact fraction of k-subsets of n samples (first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(1 for s in subsets if any(i < c for i in s)), len(subsets))


def _bench_pass(counts: list[tuple[int, int]], k: int) -> float:
    return float(sum(_brute(n, c, k) for n, c in counts) / len(counts))


def _pct(x: float) -> float:
    return round(100 * x, 1)


def _results(label: str, benches: dict[str, list[tuple[int, int]]], ks=(1, 4)) -> dict:
    n = max(n for counts in benches.values() for n, _ in counts)
    out = {"model": f"models/{label or 'x'}", "label": label, "n": n, "ks": list(ks), "temperature": 1.0,
           "top_p": 0.9, "max_new_tokens": 64, "wall_s": 1.0, "benchmarks": {}}
    for name, counts in benches.items():
        b = {"problems": len(counts), "samples": sum(n for n, _ in counts),
             "avg@n": sum(c / n for n, c in counts) / len(counts),
             "per_problem": [{"id": f"{name}-{i}", "n": n, "c": c} for i, (n, c) in enumerate(counts)]}
        for k in ks:
            b[f"pass@{k}"] = _bench_pass(counts, k)
        out["benchmarks"][name] = b
    keys = ["avg@n"] + [f"pass@{k}" for k in ks]
    out["mean"] = {k: sum(b[k] for b in out["benchmarks"].values()) / len(benches) for k in keys}
    return out


def _write_metrics(path: Path, steps: int = 6, scale: float = 1.0) -> None:
    with open(path, "w") as f:
        for s in range(steps):
            for u in range(2):
                f.write(json.dumps({"kind": "update", "step": s, "update": u, "loss": scale / (s + 1),
                                    "clip_frac": 0.0, "drift_abs_mean": 0.1 * s, "gate_min": 0.2,
                                    "gate_max": 0.8 + u * 0.1,
                                    "gate_std": 0.1, "grad_norm": 1.0, "lr": 1e-5}) + "\n")
            f.write(json.dumps({"kind": "step", "step": s, "loss": scale / (s + 1),
                                "sampled_rkl": 0.5 / (s + 1), "drift_abs_mean": 0.1 * s,
                                "gate_min": 0.2 - 0.01 * s, "gate_max": 0.8 + 0.01 * s,
                                "gate_std": 0.1, "solve_rate": 0.1 * s, "response_len": 30 + s,
                                "time/step": 0.5}) + "\n")


BASE = {"chain8": [(4, 2), (4, 0)], "chain12": [(4, 4), (4, 1)]}
TRAIN = {"chain8": [(4, 1), (4, 3)], "chain16": [(4, 0), (4, 2)]}
SEED0 = {"chain8": [(4, 1), (4, 0)], "chain12": [(4, 2), (4, 2)]}
SEED1 = {"chain8": [(4, 3), (4, 1)], "chain12": [(4, 1), (4, 0)]}


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    # eval dir with a label
    (tmp_path / "base_eval").mkdir()
    (tmp_path / "base_eval" / "results.json").write_text(json.dumps(_results("base", BASE)))
    # training run dir: eval/results.json without a label + metrics.jsonl
    (tmp_path / "trainB" / "eval").mkdir(parents=True)
    (tmp_path / "trainB" / "eval" / "results.json").write_text(json.dumps(_results("", TRAIN)))
    _write_metrics(tmp_path / "trainB" / "metrics.jsonl")
    # two seeds of one method, labels from results.json
    for i, counts in enumerate((SEED0, SEED1)):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(_results(f"opd_block-seed{i}", counts)))
        _write_metrics(d / "metrics.jsonl", scale=1.0 + i)
    # a training run without eval yet (only metrics), with a truncated last line
    (tmp_path / "metrics_only").mkdir()
    _write_metrics(tmp_path / "metrics_only" / "metrics.jsonl", steps=3)
    with open(tmp_path / "metrics_only" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "step": 3, "lo')
    return tmp_path


def test_load_run_layouts(runs_dir: Path):
    base = load_run(runs_dir / "base_eval")
    assert base.label == "base" and base.results is not None and base.metrics_path is None and base.n == 4
    train = load_run(runs_dir / "trainB")
    assert train.label == "trainB" and train.results is not None
    assert train.metrics_path == runs_dir / "trainB" / "metrics.jsonl"
    assert load_run(runs_dir / "trainB" / "eval").label == "trainB"  # eval dir inside a run: the run's name
    only = load_run(runs_dir / "metrics_only")
    assert only.results is None and only.metrics_path is not None and only.label == "metrics_only"
    (runs_dir / "empty").mkdir()
    with pytest.raises(ReportError, match="not a run directory"):
        load_run(runs_dir / "empty")
    with pytest.raises(ReportError, match="no such directory"):
        load_run(runs_dir / "nope")


def test_table_recomputes_passk_and_mean(runs_dir: Path):
    runs = [load_run(runs_dir / "base_eval"), load_run(runs_dir / "trainB")]
    header, rows = comparison_table(runs, metric="pass@2")  # pass@2 was never stored
    assert header == ["run", "chain8", "chain12", "chain16", "mean"]
    # n=4, c=2 → pass@2 = 1 − C(2,2)/C(4,2) = 5/6 (closed form agrees with brute force)
    assert _brute(4, 2, 2) == Fraction(5, 6)
    b8, b12 = _bench_pass(BASE["chain8"], 2), _bench_pass(BASE["chain12"], 2)
    assert rows[0] == ["base", _pct(b8), _pct(b12), MISSING, _pct((b8 + b12) / 2)]
    assert rows[0][1:] == [41.7, 75.0, MISSING, 58.3]
    t8, t16 = _bench_pass(TRAIN["chain8"], 2), _bench_pass(TRAIN["chain16"], 2)
    assert rows[1] == ["trainB", _pct(t8), MISSING, _pct(t16), _pct((t8 + t16) / 2)]
    # avg@n is read; pass@8 needs n >= 8 → missing everywhere
    _, rows = comparison_table(runs, metric="avg@n")
    assert rows[0][1] == _pct(0.25) and rows[0][4] == _pct((0.25 + 0.625) / 2)
    _, rows = comparison_table(runs, metric="pass@8")
    assert all(v == MISSING for row in rows for v in row[1:])
    with pytest.raises(ReportError):
        comparison_table(runs, metric="pass@0")
    with pytest.raises(ReportError, match="unknown metric"):
        comparison_table(runs, metric="bogus")


def test_markdown_and_csv(runs_dir: Path, tmp_path: Path):
    runs = [load_run(runs_dir / "base_eval"), load_run(runs_dir / "trainB")]
    header, rows = comparison_table(runs, metric="pass@1")
    md = to_markdown(header, rows).splitlines()
    assert len(md) == 4 and md[0].startswith("| run") and set(md[1]) <= set("|:-")
    assert "| base " in md[2] and MISSING in md[2] and md[1].endswith(":|")
    path = to_csv(header, rows, tmp_path / "t.csv")
    with open(path, newline="", encoding="utf-8") as f:
        got = list(csv.reader(f))
    assert got[0] == header
    assert got[1] == ["base", "25.0", "62.5", MISSING, "43.8"]  # pass@1 = avg@n
    assert got[2][0] == "trainB" and got[2][2] == MISSING


def test_seed_grouping(runs_dir: Path):
    assert seed_group_key("opd_block-seed1") == ("opd_block", 1)
    assert seed_group_key("opd_block_seed12") == ("opd_block", 12)
    assert seed_group_key("opd_block") == ("opd_block", None)
    runs = [load_run(runs_dir / d) for d in ("base_eval", "s0", "s1")]
    groups = group_by_seed(runs)
    assert [(k, len(m)) for k, m in groups] == [("base", 1), ("opd_block", 2)]
    header, rows = comparison_table(runs, metric="pass@2", group_seeds=True)
    assert [r[0] for r in rows] == ["base", "opd_block (2 seeds)"]
    assert rows[0][1] == 41.7  # a group of one shows the plain value
    for j, bench in enumerate(["chain8", "chain12"], start=1):
        vals = [100 * _bench_pass(s[bench], 2) for s in (SEED0, SEED1)]
        assert rows[1][j] == f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"
    means = [100 * (_bench_pass(s["chain8"], 2) + _bench_pass(s["chain12"], 2)) / 2 for s in (SEED0, SEED1)]
    assert rows[1][3] == f"{statistics.mean(means):.1f} ± {statistics.stdev(means):.1f}"


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIG and len(data) > 1000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_write_report_files(runs_dir: Path, tmp_path: Path):
    runs = [load_run(runs_dir / d) for d in ("base_eval", "trainB", "s0", "s1", "metrics_only")]
    out = tmp_path / "rep"
    paths = write_report(runs, out, metric="pass@2", group_seeds=True)
    assert set(paths) == {"md", "csv", "bars", "passk", "training"}
    for key in ("bars", "passk", "training"):
        _check_png(paths[key])
    md = paths["md"].read_text(encoding="utf-8")
    assert "## pass@2 (%)" in md and "opd_block (2 seeds)" in md and "![" in md and "(passk.png)" in md
    assert "(training.png)" in md and "avg@4" in md
    with open(paths["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == ["base", "trainB", "opd_block (2 seeds)"]  # metrics-only run: no row


def test_cli_report(runs_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli_out"
    rc = main(["report", str(runs_dir / "base_eval"), str(runs_dir / "trainB"), "--metric", "pass@2",
               "--out", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| base" in stdout and "41.7" in stdout and "58.3" in stdout
    assert f"wrote {out / 'report.md'}" in stdout
    for name in ("report.csv", "bars.png", "passk.png", "training.png"):
        assert (out / name).is_file()
    rc = main(["report", str(runs_dir / "nope"), "--out", str(out)])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
