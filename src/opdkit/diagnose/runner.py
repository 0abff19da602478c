"""``opdkit diagnose`` end to end: sample student rollouts, probe their nodes, score, write the report.

methods.md §6 (arXiv 2605.10889). Outputs in ``out``: ``nodes.jsonl`` (one line per node and teacher),
``rollouts.jsonl`` (one line per rollout: tokens, reward, per-method means, gate weights),
``aggregates.json``, ``summary.json``, ``report.md``, ``alignment_hist.png``, ``alignment_depth.png``
and ``rollouts.html`` (see :mod:`opdkit.diagnose.report`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from opdkit.diagnose.alignment import node_record
from opdkit.diagnose.directions import concat_cosine, method_names
from opdkit.diagnose.gating import GateSpec, gate_spec_from_run, rollout_gates, run_gate_model
from opdkit.diagnose.nodes import ProbeParams
from opdkit.diagnose.parallel import ProbeContext, ProbeJob, grade_fn, probe_stream

MINIATURE = Path(__file__).resolve().parent.parent / "assets" / "miniature"


@dataclass
class DiagnoseSettings:
    """Everything ``opdkit diagnose`` needs (the CLI builds it from its arguments)."""

    student: str = "miniature"
    teachers: list[str] = field(default_factory=lambda: ["miniature"])
    data: str = "chain7"
    n_rollouts: int = 64
    samples_per_question: int = 1
    offset: int = 0
    grader: str | Callable = "auto"  # chain, math, auto, or fn(responses, answers) -> list[Verdict | float]
    probe: ProbeParams = ProbeParams()
    lsm_k: int = 3
    jsd_betas: tuple[float, ...] = ()
    seed: int = 0
    out: str = "diagnose_out"
    template: str | None = None
    chat_template: str = "auto"
    data_dir: str = ""
    device: str = ""
    dtype: str = "auto"
    run_dir: str = ""
    gate_model: str = ""
    gate: GateSpec = GateSpec()
    trust_remote_code: bool = False
    progress: bool = True
    workers: int = 1
    command: str = ""


def resolve_model_path(spec: str, role: str) -> str:
    """``miniature`` -> the shipped ``assets/miniature/{role}``; anything else unchanged."""
    if spec == "miniature":
        path = MINIATURE / role
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shipped miniature {role} is missing at {path}; build it with "
                                    "`python -m opdkit.tasks.prepare --out src/opdkit/assets/miniature`")
        return str(path)
    return spec


def _eos_ids(model, tok) -> list[int]:
    """The tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    e = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(e) if isinstance(e, list) else ({e} if isinstance(e, int) else set())
    return sorted(ids)


def _teacher_names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        base = p if p == "miniature" else (Path(p).name or p)
        name, i = base, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def _is_chain(problems) -> bool:
    from opdkit.tasks.chain import parse_problem

    try:
        parse_problem(problems[0].problem)
        return True
    except ValueError:
        return False


def _load_problems(s: DiagnoseSettings):
    """Problems of ``s.data``: registered names, ``.jsonl`` paths, or ``chainK`` for any K in 1..26
    (``make_benchmark(K)``: the miniature's benchmark stream with ``K`` steps; chain8 / 12 / 16 / 24 are
    the registered held-out ones)."""
    import re

    from opdkit.cli.eval_cmd import load_benchmarks
    from opdkit.eval.benchmarks import Problem
    from opdkit.tasks.chain import BENCHMARK_KS, MAX_K, make_benchmark

    probs = []
    for name in [x.strip() for x in s.data.split(",") if x.strip()]:
        m = re.fullmatch(r"chain(\d+)", name)
        if m and name not in BENCHMARK_KS and 1 <= int(m.group(1)) <= MAX_K:
            probs += [Problem(id=r["id"], problem=r["problem"], answer=r["answer"], source=r["source"], extra={})
                      for r in make_benchmark(int(m.group(1)))]
        else:
            probs += [p for ps in load_benchmarks(name, s.data_dir).values() for p in ps]
    if not probs:
        raise ValueError(f"no problems in {s.data!r}")
    return probs


def _sample(student, tok, problems, s: DiagnoseSettings, grade, template: str, chat: bool, eos, gen):
    """The diagnosed rollouts: ``n_rollouts`` rows, ``samples_per_question`` per problem, graded."""
    from opdkit.data import format_prompt
    from opdkit.rollout.sampler import SamplingParams, sample_rollouts

    S = s.samples_per_question
    nq = math.ceil(s.n_rollouts / S)
    chosen = problems[s.offset:s.offset + nq]
    if len(chosen) < nq:
        raise ValueError(f"--n-rollouts {s.n_rollouts} needs {nq} problems after --offset {s.offset}; "
                         f"the data has {len(problems)}")
    pr = s.probe
    sp = SamplingParams(temperature=pr.temperature, top_p=pr.top_p, max_new_tokens=pr.max_new_tokens,
                        samples_per_prompt=S)
    rows = []
    for c in range(0, nq, 8):
        chunk = chosen[c:c + 8]
        prompts = [format_prompt(tok, p.problem, template=template, chat_template=chat) for p in chunk]
        batch = sample_rollouts(student, prompts, sp, eos_token_ids=eos, pad_token_id=tok.pad_token_id,
                                generator=gen)
        for i in range(batch.size):
            rows.append((chunk[i // S], prompts[i // S], batch.select([i]).to("cpu")))
    rows = rows[:s.n_rollouts]
    texts = [tok.decode(b.response_ids_BT[0][b.response_mask_BT[0].bool()].tolist(), skip_special_tokens=True)
             for _, _, b in rows]
    rewards = grade(texts, [p.answer for p, _, _ in rows])
    return rows, texts, rewards


def diagnose(s: DiagnoseSettings) -> dict:
    """Run the whole diagnosis (module docstring); returns ``summary.json``'s dict."""
    from opdkit.config import QWEN_MATH_TEMPLATE
    from opdkit.diagnose.report import write_report
    from opdkit.models import load_model, load_tokenizer

    t_start = time.perf_counter()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    problems = _load_problems(s)
    chain = _is_chain(problems)
    grader = s.grader if callable(s.grader) else (s.grader if s.grader != "auto" else ("chain" if chain else "math"))
    grader_name = grader if isinstance(grader, str) else getattr(grader, "__name__", "custom")
    grade = grade_fn(grader)
    template = s.template if s.template is not None else ("{problem}\n" if chain else QWEN_MATH_TEMPLATE)
    chat = (not chain) if s.chat_template == "auto" else s.chat_template == "on"
    load = dict(dtype=dtype, device=device, trust_remote_code=s.trust_remote_code)
    student_path = resolve_model_path(s.student, "student")
    tok = load_tokenizer(student_path, trust_remote_code=s.trust_remote_code)
    student = load_model(student_path, **load).eval()
    names = _teacher_names(s.teachers)
    teacher_paths = {n: resolve_model_path(p, "teacher") for n, p in zip(names, s.teachers)}
    teachers = {n: load_model(p, **load).eval() for n, p in teacher_paths.items()}
    vocab = min([student.get_input_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]]
                + [t.get_output_embeddings().weight.shape[0] for t in teachers.values()])
    eos = _eos_ids(student, tok)
    gate_spec, gate_model, gate_path = s.gate, None, s.gate_model
    if s.run_dir:
        gate_spec = gate_spec_from_run(s.run_dir, tok, fallback=s.gate)
        gate_path = gate_path or str(run_gate_model(s.run_dir) or "")
        if not gate_path:
            print(f"opdkit diagnose: {s.run_dir} has no final/ model; no drift-gate view (give --gate-model)")
    if gate_path:
        gate_model = load_model(gate_path, **load).eval()
    methods = method_names(s.jsd_betas)

    gen = torch.Generator(device=device).manual_seed(s.seed)
    t0 = time.perf_counter()
    rows, texts, rewards = _sample(student, tok, problems, s, grade, template, chat, eos, gen)
    t_rollouts = time.perf_counter() - t0
    ctx = ProbeContext(student_path, teacher_paths, load, grader, s.probe, eos, tok.pad_token_id, vocab, s.seed,
                       models={"student": student, "teachers": teachers, "tok": tok, "grade": grade})
    jobs = [ProbeJob(r, prompt_ids, b.response_ids_BT[0][b.response_mask_BT[0].bool()].tolist(), prob.answer)
            for r, (prob, prompt_ids, b) in enumerate(rows)]

    def decode_token(i):
        return tok.decode([i], skip_special_tokens=False)

    bar = None
    if s.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="diagnose", unit="rollout", dynamic_ncols=True)
    stats = {"completions": 0, "completion_tokens": 0, "sample_seconds": 0.0, "nodes": 0, "skipped": 0}
    rollout_recs = []
    t_probe = time.perf_counter()
    with open(out / "nodes.jsonl", "w") as f_nodes, probe_stream(ctx, jobs, s.workers) as stream:
        for job, probes, (prob, _, b), text, reward in zip(jobs, stream, rows, texts, rewards):
            gates = (rollout_gates(gate_model, b, gate_spec)[0, :len(job.response_ids)].tolist()
                     if gate_model is not None else None)
            rrec = {"rollout": job.rollout, "question": prob.id, "problem": prob.problem, "answer": prob.answer,
                    "reward": reward, "correct": bool(reward > 0), "stop": b.stop_reasons[0], "response": text,
                    "token_ids": job.response_ids, "tokens": [decode_token(i) for i in job.response_ids],
                    "gates": gates, "teachers": {}}
            for pb in probes:
                stats["completions"] += pb.completions
                stats["completion_tokens"] += pb.completion_tokens
                stats["sample_seconds"] += pb.sample_seconds
            for name in names:
                rrec["teachers"][name] = _teacher_part(probes, name, methods, rrec, s.lsm_k, decode_token, f_nodes,
                                                       stats)
            rollout_recs.append(rrec)
            if bar is not None:
                bar.update(1)
                cps = stats["completions"] / max(stats["sample_seconds"], 1e-9)
                bar.set_postfix(nodes=stats["nodes"], completions_per_s=f"{cps:.0f}")
    if bar is not None:
        bar.close()
    t_probe = time.perf_counter() - t_probe
    with open(out / "rollouts.jsonl", "w") as f:
        for rr in rollout_recs:
            f.write(json.dumps(rr) + "\n")
    summary = {
        "command": s.command, "settings": _settings_dict(s), "grader": grader_name, "teachers": names,
        "methods": methods, "rollouts": len(rollout_recs), "correct": sum(bool(x > 0) for x in rewards),
        "nodes": stats["nodes"], "skipped_gstar_zero": stats["skipped"], "completions": stats["completions"],
        "completion_tokens": stats["completion_tokens"], "sample_seconds": round(stats["sample_seconds"], 3),
        "completions_per_s": round(stats["completions"] / max(stats["sample_seconds"], 1e-9), 1),
        "completion_tokens_per_s": round(stats["completion_tokens"] / max(stats["sample_seconds"], 1e-9), 1),
        "completions_per_probe_s": round(stats["completions"] / max(t_probe, 1e-9), 1),
        "rollout_seconds": round(t_rollouts, 3), "probe_seconds": round(t_probe, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3), "workers": s.workers,
        "gate": None if gate_model is None else {
            "name": gate_spec.name, "tau": gate_spec.tau, "block_size": gate_spec.params.block_size,
            "model": gate_path, "source": gate_spec.source or "command line"},
        "run_dir": s.run_dir or None, "device": str(device), "threads": torch.get_num_threads(),
    }
    write_report(out, summary, rollout_recs)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _teacher_part(probes, name, methods, rrec, lsm_k, decode_token, f_nodes, stats) -> dict:
    """Write the node records of one rollout x teacher; return its per-rollout summary."""
    gs, ds, ws, node_align, node_cands = [], {m: [] for m in methods}, [], {}, {}
    gates = rrec["gates"]
    for pb in probes:
        w = gates[pb.pos] if gates is not None else None
        rec, g_C, dirs = node_record(pb, name, methods, lsm_k=lsm_k, reward=rrec["reward"], gate=w,
                                     decode_token=decode_token)
        rec = {"rollout": rrec["rollout"], "question": rrec["question"], "correct": rrec["correct"], **rec}
        f_nodes.write(json.dumps(rec) + "\n")
        stats["nodes"] += 1
        stats["skipped"] += int(rec["skipped"])
        node_align[pb.pos] = rec["alignment"]
        node_cands[pb.pos] = [list(x) for x in zip(rec["candidate_text"], rec["p"], rec["q"], rec["psucc"])]
        if not rec["skipped"]:
            gs.append(g_C)
            ws.append(w if w is not None else 1.0)
            for m in methods:
                ds[m].append(dirs[m])
    return {"nodes": len(probes), "scored": len(gs), "node_alignment": node_align, "node_cands": node_cands,
            "concat": {m: _nan_none(concat_cosine(gs, ds[m])) for m in methods} if gs else {},
            "concat_gated": ({m: _nan_none(concat_cosine(gs, ds[m], ws)) for m in methods}
                             if gs and gates is not None else {})}


def _nan_none(x: float) -> float | None:
    return None if not math.isfinite(x) else round(x, 6)


def _settings_dict(s: DiagnoseSettings) -> dict:
    d = asdict(s)
    d["grader"] = s.grader if isinstance(s.grader, str) else getattr(s.grader, "__name__", "custom")
    d["gate"] = {"name": s.gate.name, "tau": s.gate.tau, "block_size": s.gate.params.block_size}
    return d
