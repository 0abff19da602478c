"""Evaluation: sample ``n`` responses per problem, verify them, report avg@n and unbiased pass@k.

The estimator is in ``docs/methods.md`` §7. Writes ``results.json`` (with per-problem counts, so any
pass@k with k ≤ n can be recomputed), ``results.md``, ``results.csv`` and ``samples.jsonl`` (every
response, the answer the grader extracted and its verdict).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from opdkit.eval.passk import avg_at_n, mean_pass_at_k
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.runtime.benchmarks import is_chain
from opdkit.runtime.graders import resolve_grader
from opdkit.runtime.models import eos_token_ids
from opdkit.runtime.problems import Problem
from opdkit.runtime.prompts import PromptSettings, format_prompt

#: The paper's evaluation sampling (T = 1.0, top-p 0.9), responses up to 1024 tokens.
DEFAULT_SAMPLING = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=1024)
DEFAULT_PROMPT = PromptSettings()


def evaluate(model, tok, benchmarks: dict[str, list[Problem]], *, n: int = 8, ks: tuple[int, ...] = (1, 8),
             sampling: SamplingParams = DEFAULT_SAMPLING, prompt: PromptSettings = DEFAULT_PROMPT,
             grader: str | Callable = "auto", prompts_per_batch: int = 8, seed: int = 0,
             out_dir: str | Path | None = None, progress: bool = True, label: str = "", model_name: str = "") -> dict:
    """Evaluate ``model`` on named problem sets; returns the results dict (also written to ``out_dir``).

    ``sampling`` gives temperature / top-p / length (its ``samples_per_prompt`` is replaced by ``n``);
    ``prompt`` and ``grader`` ``auto`` follow the problems (chain problems: plain prompt, chain grader).
    """
    bad = [k for k in ks if k > n or k < 1]
    if bad:
        raise ValueError(f"every k must be in 1..n={n}; got {bad} (raise --n or drop them)")
    chain = all(is_chain(ps) for ps in benchmarks.values())
    _, grade = resolve_grader(grader, chain=chain)
    template, chat = prompt.resolve(chain=chain)
    params = dataclasses.replace(sampling, samples_per_prompt=n)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    run = _Run(model, tok, params, gen, eos_token_ids(model, tok), grade,
               lambda p: format_prompt(tok, p.problem, template=template, chat_template=chat))
    results: dict = {"model": model_name, "label": label, "n": n, "ks": list(ks), "temperature": params.temperature,
                     "top_p": params.top_p, "max_new_tokens": params.max_new_tokens, "seed": seed, "benchmarks": {}}
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        samples_f = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            samples_f = stack.enter_context(open(Path(out_dir) / "samples.jsonl", "w"))
        bar = stack.enter_context(_progress(progress, sum(len(v) for v in benchmarks.values())))
        for name, problems in benchmarks.items():
            per_problem = []
            for s in range(0, len(problems), prompts_per_batch):
                per_problem += run.chunk(name, problems[s:s + prompts_per_batch], samples_f)
                if bar is not None:
                    bar.update(len(problems[s:s + prompts_per_batch]))
                    bar.set_postfix(bench=name, solve=f"{run.solved / max(run.seen, 1):.3f}")
            results["benchmarks"][name] = summarize(per_problem, ks)
    names = list(results["benchmarks"])
    keys = ["avg@n"] + [f"pass@{k}" for k in ks]
    results["mean"] = {k: sum(results["benchmarks"][b][k] for b in names) / len(names) for k in keys}
    results["wall_s"] = time.perf_counter() - t_start
    if out_dir is not None:
        write_results(results, Path(out_dir))
    return results


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="eval", unit="problem", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


class _Run:
    """Samples, grades and records one chunk of problems at a time; keeps the running solve rate."""

    def __init__(self, model, tok, params, gen, eos, grade, prompt_of):
        self.model, self.tok, self.params, self.gen, self.eos, self.grade = model, tok, params, gen, eos, grade
        self.prompt_of, self.solved, self.seen = prompt_of, 0, 0

    def chunk(self, name: str, chunk: list[Problem], samples_f) -> list[dict]:
        n = self.params.samples_per_prompt
        batch = sample_rollouts(self.model, [self.prompt_of(p) for p in chunk], self.params, eos_token_ids=self.eos,
                                pad_token_id=self.tok.pad_token_id, generator=self.gen)
        texts = batch.decode(self.tok)
        verdicts = self.grade(texts, [p.answer for p in chunk for _ in range(n)])
        out = []
        for i, p in enumerate(chunk):
            vs = verdicts[i * n:(i + 1) * n]
            c = sum(v.reward for v in vs)
            out.append({"id": p.id, "n": n, "c": c})
            self.solved, self.seen = self.solved + c, self.seen + n
            for j, v in enumerate(vs if samples_f is not None else ()):
                samples_f.write(json.dumps({
                    "benchmark": name, "id": p.id, "sample": j, "answer": p.answer, "response": texts[i * n + j],
                    "extracted": v.extracted, "reward": v.reward, "reason": v.reason,
                    "stop": batch.stop_reasons[i * n + j]}) + "\n")
        return out


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
