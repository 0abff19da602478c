"""Evaluation: sample ``n`` responses per problem, verify them, report avg@n and unbiased pass@k (§7).

Writes ``results.json`` (with per-problem counts, so any pass@k with k ≤ n can be recomputed),
``results.md``, ``results.csv`` and ``samples.jsonl`` (every response, extracted answer and verdict).
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opdkit.config import QWEN_MATH_TEMPLATE
from opdkit.data import format_prompt
from opdkit.eval.benchmarks import Problem
from opdkit.eval.passk import avg_at_n, mean_pass_at_k
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.verify import Verdict

_CHAIN_ANSWER = re.compile(r"answer:\s*(-?\d+)")
Grader = Callable[[list[str], list[str]], list[Verdict]]


def _math_grader(responses: list[str], answers: list[str]) -> list[Verdict]:
    from opdkit.verify import grade_many

    return grade_many(responses, answers)


def _chain_grader(responses: list[str], answers: list[str]) -> list[Verdict]:
    from opdkit.tasks.chain import grade_chain

    out = []
    for r, a in zip(responses, answers):
        ok = int(grade_chain(r, a))
        found = _CHAIN_ANSWER.findall(r)
        got = found[-1] if found else None
        out.append(Verdict(reward=ok, extracted=got,
                           reason="correct" if ok else ("no_answer" if got is None else "mismatch")))
    return out


GRADERS: dict[str, Grader] = {"math": _math_grader, "chain": _chain_grader}


def get_grader(name: str) -> Grader:
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; valid: {', '.join(GRADERS)}") from None


def _eos_ids(model, tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    e = getattr(gen, "eos_token_id", None)
    ids |= set(e) if isinstance(e, list) else ({e} if isinstance(e, int) else set())
    return sorted(ids)


def evaluate(model, tok, benchmarks: dict[str, list[Problem]], *, n: int = 8, ks: tuple[int, ...] = (1, 8),
             temperature: float = 1.0, top_p: float = 0.9, max_new_tokens: int = 1024,
             template: str = QWEN_MATH_TEMPLATE, chat_template: bool = True, prompts_per_batch: int = 8,
             seed: int = 0, grader: str | Grader = "math", out_dir: str | Path | None = None,
             progress: bool = True, label: str = "", model_name: str = "") -> dict:
    """Evaluate ``model`` on named benchmarks; returns the results dict (also written to ``out_dir``)."""
    bad = [k for k in ks if k > n or k < 1]
    if bad:
        raise ValueError(f"every k must be in 1..n={n}; got {bad} (raise --n or drop them)")
    grade = get_grader(grader) if isinstance(grader, str) else grader
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            samples_per_prompt=n)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = _eos_ids(model, tok)
    total = sum(len(v) for v in benchmarks.values())
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="eval", unit="problem", dynamic_ncols=True)
    samples_f = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_f = open(out_dir / "samples.jsonl", "w")
    t_start = time.perf_counter()
    results: dict = {"model": model_name, "label": label, "n": n, "ks": list(ks), "temperature": temperature,
                     "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed, "benchmarks": {}}
    solved, seen = 0, 0
    try:
        for name, problems in benchmarks.items():
            per_problem = []
            for s in range(0, len(problems), prompts_per_batch):
                chunk = problems[s:s + prompts_per_batch]
                prompts = [format_prompt(tok, p.problem, template=template, chat_template=chat_template)
                           for p in chunk]
                batch = sample_rollouts(model, prompts, params, eos_token_ids=eos, pad_token_id=tok.pad_token_id,
                                        generator=gen)
                texts = tok.batch_decode([r[m.bool()].tolist() for r, m in
                                          zip(batch.response_ids_BT.cpu(), batch.response_mask_BT.cpu())],
                                         skip_special_tokens=True)
                answers = [p.answer for p in chunk for _ in range(n)]
                verdicts = grade(texts, answers)
                for i, p in enumerate(chunk):
                    vs = verdicts[i * n:(i + 1) * n]
                    c = sum(v.reward for v in vs)
                    per_problem.append({"id": p.id, "n": n, "c": c})
                    solved, seen = solved + c, seen + n
                    if samples_f is not None:
                        for j, v in enumerate(vs):
                            samples_f.write(json.dumps({
                                "benchmark": name, "id": p.id, "sample": j, "answer": p.answer,
                                "response": texts[i * n + j], "extracted": v.extracted, "reward": v.reward,
                                "reason": v.reason, "stop": batch.stop_reasons[i * n + j]}) + "\n")
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix(bench=name, solve=f"{solved / max(seen, 1):.3f}")
            results["benchmarks"][name] = summarize(per_problem, ks)
    finally:
        if bar is not None:
            bar.close()
        if samples_f is not None:
            samples_f.close()
    names = list(results["benchmarks"])
    keys = ["avg@n"] + [f"pass@{k}" for k in ks]
    results["mean"] = {k: sum(results["benchmarks"][b][k] for b in names) / len(names) for k in keys}
    results["wall_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def summarize(per_problem: list[dict], ks) -> dict:
    """avg@n and pass@k of one benchmark from per-problem ``(n, c)`` counts."""
    n_P = [p["n"] for p in per_problem]
    c_P = [p["c"] for p in per_problem]
    out = {"problems": len(per_problem), "samples": sum(n_P), "avg@n": avg_at_n(n_P, c_P)}
    for k in ks:
        out[f"pass@{k}"] = mean_pass_at_k(n_P, c_P, k)
    out["per_problem"] = per_problem
    return out


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = metrics, columns = benchmarks + mean, in percent."""
    names = list(results["benchmarks"])
    header = ["metric"] + names + ["mean"]
    keys = ["avg@n"] + [f"pass@{k}" for k in results["ks"]]
    rows = [[k.replace("@n", f"@{results['n']}")] + [f"{100 * results['benchmarks'][b][k]:.1f}" for b in names]
            + [f"{100 * results['mean'][k]:.1f}"] for k in keys]
    return header, rows


def write_results(results: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    header, rows = results_table(results)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    title = results.get("label") or results.get("model") or "model"
    (out_dir / "results.md").write_text(
        f"# {title}: n = {results['n']} samples per problem, T = {results['temperature']}, "
        f"top-p = {results['top_p']} (percent)\n\n" + "\n".join(md) + "\n")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
