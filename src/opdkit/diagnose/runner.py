"""``opdkit diagnose`` end to end: sample student rollouts, probe their nodes, score, write the report.

``docs/methods.md`` §6 (arXiv 2605.10889). Outputs in ``out``: ``nodes.jsonl`` (one line per node and
teacher), ``rollouts.jsonl`` (one line per rollout: tokens, reward, per-method means, gate weights),
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
from opdkit.diagnose.contexts import SELF, parse_teachers, resolved_contexts, teacher_prompt_ids
from opdkit.diagnose.directions import concat_cosine, method_names
from opdkit.diagnose.gating import GateSpec, gate_spec_from_run, rollout_gates, run_gate_model
from opdkit.diagnose.nodes import ProbeParams
from opdkit.diagnose.parallel import ProbeContext, ProbeJob, probe_stream
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.runtime.benchmarks import is_chain, load_problem_sets
from opdkit.runtime.graders import GRADERS, as_reward_fn, resolve_grader
from opdkit.runtime.models import DTYPE_CHOICES, eos_token_ids, load_frozen, load_tokenizer, resolve_device
from opdkit.runtime.prompts import PromptSettings, format_prompt
from opdkit.runtime.settings import ConfigError, F, check_choice, check_device

MINIATURE = Path(__file__).resolve().parent.parent / "assets" / "miniature"


@dataclass
class DiagnoseSettings:
    """Everything ``opdkit diagnose`` needs (the CLI builds it from its arguments); :meth:`validate` names the
    field to fix."""

    student: str = F("miniature", "student path / hub id, or 'miniature' (the shipped one)")
    teachers: list[str] = F(["miniature"], "teachers: a path / hub id ('miniature': the shipped teacher), "
                                           "self:CONTEXT (the student under a privileged context: solution, "
                                           "answer, hint or a template; opdkit extension) or MODEL:PRESET")
    data: str = F("chain12@7", "comma-separated problem sets: chainK or chainK@SEED, registered names, .jsonl "
                               "paths (default: the CLI's, dev-seed chain12 problems)")
    n_rollouts: int = F(64, "student rollouts to diagnose")
    samples_per_question: int = F(1, "rollouts per question")
    offset: int = F(0, "skip the first questions of the data")
    grader: str | Callable = F("auto", "chain, math, auto (chain for chain problems), or fn(responses, answers) "
                                       "-> list[Verdict | float]")
    probe: ProbeParams = F(ProbeParams(), "node probing: candidates, completions, budget")
    lsm_k: int = F(3, "LSM support size: the teacher's top-K inside each node's candidate set (labelled in the "
                      "report); not training's loss.topk (top-K of the full vocabulary), see --lsm-k")
    jsd_betas: tuple[float, ...] = F((), "extra generalized-JSD beta values (0.5 is built in)")
    hint_lines: int = F(2, "lines of the solution that a context's {hint} holds")
    seed: int = F(0, "seed of the rollouts and of every node's completions")
    out: str = F("diagnose_out", "output directory")
    prompt: PromptSettings = F(PromptSettings(), "prompt template and chat-template setting")
    data_dir: str = F("", "directory of the math benchmark files (default: $OPDKIT_DATA_DIR)")
    device: str = F("auto", "auto (cuda when available), cpu, cuda")
    dtype: str = F("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    run_dir: str = F("", "training run: drift-gate settings from its config.yaml, its final/ as current policy")
    gate_model: str = F("", "current-policy model for the drift-gate view (overrides run_dir's final/)")
    gate: GateSpec = F(GateSpec(), "gate shown when no run config says")
    trust_remote_code: bool = F(False, "allow model code from the hub")
    progress: bool = F(True, "show a progress bar")
    workers: int = F(1, "processes probing rollouts in parallel, one thread each (results do not depend on it)")
    command: str = F("", "the command line, recorded in summary.json")

    def validate(self) -> DiagnoseSettings:
        for name, lo in (("n_rollouts", 1), ("samples_per_question", 1), ("lsm_k", 1), ("offset", 0), ("workers", 1),
                         ("hint_lines", 1)):
            if getattr(self, name) < lo:
                raise ConfigError(f"{name} = {getattr(self, name)} must be >= {lo}")
        if not self.teachers:
            raise ConfigError("teachers is empty: give at least one teacher model")
        parse_teachers(self.teachers)
        if not callable(self.grader):
            check_choice("grader", self.grader, (*GRADERS, "auto"))
        check_choice("dtype", self.dtype, DTYPE_CHOICES)
        check_device("device", self.device or "auto")
        self.prompt.validate()
        return self


def resolve_model_path(spec: str, role: str) -> str:
    """``miniature`` -> the shipped ``assets/miniature/{role}``; anything else unchanged."""
    if spec == "miniature":
        path = MINIATURE / role
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shipped miniature {role} is missing at {path}; build it with "
                                    "`python -m opdkit.tasks.prepare --out src/opdkit/assets/miniature`")
        return str(path)
    return spec


def _load_problems(s: DiagnoseSettings):
    """Problems of ``s.data`` in order (every set's, concatenated)."""
    probs = [p for ps in load_problem_sets(s.data, s.data_dir).values() for p in ps]
    if not probs:
        raise ValueError(f"no problems in {s.data!r}")
    return probs


@dataclass
class _Setup:
    """What a diagnosis runs on: models, problems, grading, prompts and the optional gate view."""

    problems: list
    grader_name: str
    grader: str | Callable
    grade: Callable
    template: str
    chat: bool
    device: torch.device
    load: dict
    student_path: str
    tok: object
    student: object
    teacher_paths: dict
    teachers: dict
    vocab: int
    eos: list[int]
    gate_spec: GateSpec
    gate_model: object = None
    gate_path: str = ""
    names: list[str] = field(default_factory=list)
    contexts: dict = field(default_factory=dict)  # {teacher name: context template} (diagnose.contexts)


def _setup(s: DiagnoseSettings) -> _Setup:
    problems = _load_problems(s)
    chain = is_chain(problems)
    grader_name, fn = resolve_grader(s.grader, chain=chain)
    grader = s.grader if callable(s.grader) else grader_name  # a name travels to worker processes
    template, chat = s.prompt.resolve(chain=chain)
    device = resolve_device(s.device)
    load = dict(dtype=s.dtype, device=device, trust_remote_code=s.trust_remote_code)
    student_path = resolve_model_path(s.student, "student")
    tok = load_tokenizer(student_path, trust_remote_code=s.trust_remote_code)
    student = load_frozen(student_path, **load)
    specs = parse_teachers(s.teachers)
    names = [t.name for t in specs]
    contexts = resolved_contexts(specs, problems, template, chain=chain, hint_lines=s.hint_lines)
    teacher_paths = {t.name: student_path if t.model == SELF else resolve_model_path(t.model, "teacher")
                     for t in specs}
    loaded = {student_path: student}  # a self-teacher is the (frozen) student itself; one copy per path
    for p in teacher_paths.values():
        if p not in loaded:
            loaded[p] = load_frozen(p, **load)
    teachers = {n: loaded[p] for n, p in teacher_paths.items()}
    vocab = min([student.get_input_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]]
                + [t.get_output_embeddings().weight.shape[0] for t in teachers.values()])
    gate_spec, gate_path = s.gate, s.gate_model
    if s.run_dir:
        gate_spec = gate_spec_from_run(s.run_dir, tok, fallback=s.gate)
        gate_path = gate_path or str(run_gate_model(s.run_dir) or "")
        if not gate_path:
            print(f"opdkit diagnose: {s.run_dir} has no final/ model; no drift-gate view (give --gate-model)")
    return _Setup(problems, grader_name, grader, as_reward_fn(fn), template, chat, device, load, student_path, tok,
                  student, teacher_paths, teachers, vocab, eos_token_ids(student, tok), gate_spec,
                  load_frozen(gate_path, **load) if gate_path else None, gate_path, names, contexts)


def _sample(st: _Setup, s: DiagnoseSettings, gen):
    """The diagnosed rollouts: ``n_rollouts`` rows, ``samples_per_question`` per problem, graded."""
    S = s.samples_per_question
    nq = math.ceil(s.n_rollouts / S)
    chosen = st.problems[s.offset:s.offset + nq]
    if len(chosen) < nq:
        raise ValueError(f"--n-rollouts {s.n_rollouts} needs {nq} problems after --offset {s.offset}; "
                         f"the data has {len(st.problems)}")
    pr = s.probe
    sp = SamplingParams(temperature=pr.temperature, top_p=pr.top_p, max_new_tokens=pr.max_new_tokens,
                        samples_per_prompt=S)
    rows = []
    for c in range(0, nq, 8):
        chunk = chosen[c:c + 8]
        prompts = [format_prompt(st.tok, p.problem, template=st.template, chat_template=st.chat) for p in chunk]
        batch = sample_rollouts(st.student, prompts, sp, eos_token_ids=st.eos, pad_token_id=st.tok.pad_token_id,
                                generator=gen)
        for i in range(batch.size):
            rows.append((chunk[i // S], prompts[i // S], batch.select([i]).to("cpu")))
    rows = rows[:s.n_rollouts]
    texts = [b.decode(st.tok)[0] for _, _, b in rows]
    rewards = st.grade(texts, [p.answer for p, _, _ in rows])
    return rows, texts, rewards


def diagnose(s: DiagnoseSettings) -> dict:
    """Run the whole diagnosis (module docstring); returns ``summary.json``'s dict."""
    from opdkit.diagnose.report import write_report

    t_start = time.perf_counter()
    s.validate()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    st = _setup(s)
    methods = method_names(s.jsd_betas)
    gen = torch.Generator(device=st.device).manual_seed(s.seed)
    t0 = time.perf_counter()
    rows, texts, rewards = _sample(st, s, gen)
    t_rollouts = time.perf_counter() - t0
    ctx = ProbeContext(st.student_path, st.teacher_paths, st.load, st.grader, s.probe, st.eos, st.tok.pad_token_id,
                       st.vocab, s.seed, models={"student": st.student, "teachers": st.teachers, "tok": st.tok,
                                                 "grade": st.grade})
    t_probe = time.perf_counter()
    rollout_recs, stats = _probe_all(st, s, ctx, rows, texts, rewards, methods, out)
    t_probe = time.perf_counter() - t_probe
    with open(out / "rollouts.jsonl", "w") as f:
        for rr in rollout_recs:
            f.write(json.dumps(rr) + "\n")
    summary = _summary(s, st, methods, rollout_recs, rewards, stats, t_rollouts, t_probe, t_start)
    write_report(out, summary, rollout_recs)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _probe_all(st: _Setup, s: DiagnoseSettings, ctx, rows, texts, rewards, methods, out: Path):
    """Probe every rollout's nodes (in ``s.workers`` processes), write ``nodes.jsonl``; returns the per-rollout
    records and the completion / node counts."""
    jobs = [ProbeJob(r, prompt_ids, b.response_token_ids()[0], prob.answer,
                     teacher_prompt_ids(st.tok, prob, st.contexts, hint_lines=s.hint_lines, chat=st.chat))
            for r, (prob, prompt_ids, b) in enumerate(rows)]

    def decode_token(i):
        return st.tok.decode([i], skip_special_tokens=False)

    bar = None
    if s.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="diagnose", unit="rollout", dynamic_ncols=True)
    stats = {"completions": 0, "completion_tokens": 0, "sample_seconds": 0.0, "nodes": 0, "skipped": 0}
    rollout_recs = []
    with open(out / "nodes.jsonl", "w") as f_nodes, probe_stream(ctx, jobs, s.workers) as stream:
        for job, probes, (prob, _, b), text, reward in zip(jobs, stream, rows, texts, rewards):
            gates = (rollout_gates(st.gate_model, b, st.gate_spec)[0, :len(job.response_ids)].tolist()
                     if st.gate_model is not None else None)
            rrec = {"rollout": job.rollout, "question": prob.id, "problem": prob.problem, "answer": prob.answer,
                    "reward": reward, "correct": bool(reward > 0), "stop": b.stop_reasons[0], "response": text,
                    "token_ids": job.response_ids, "tokens": [decode_token(i) for i in job.response_ids],
                    "gates": gates, "teachers": {}}
            for pb in probes:
                stats["completions"] += pb.completions
                stats["completion_tokens"] += pb.completion_tokens
                stats["sample_seconds"] += pb.sample_seconds
            for name in st.names:
                rrec["teachers"][name] = _teacher_part(probes, name, methods, rrec, s.lsm_k, decode_token, f_nodes,
                                                       stats)
            rollout_recs.append(rrec)
            if bar is not None:
                bar.update(1)
                cps = stats["completions"] / max(stats["sample_seconds"], 1e-9)
                bar.set_postfix(nodes=stats["nodes"], completions_per_s=f"{cps:.0f}")
    if bar is not None:
        bar.close()
    return rollout_recs, stats


def _summary(s, st: _Setup, methods, rollout_recs, rewards, stats, t_rollouts, t_probe, t_start) -> dict:
    per_s = max(stats["sample_seconds"], 1e-9)
    return {
        "command": s.command, "settings": _settings_dict(s), "grader": st.grader_name, "teachers": st.names,
        "contexts": st.contexts,
        "methods": methods, "rollouts": len(rollout_recs), "correct": sum(bool(x > 0) for x in rewards),
        "nodes": stats["nodes"], "skipped_gstar_zero": stats["skipped"], "completions": stats["completions"],
        "completion_tokens": stats["completion_tokens"], "sample_seconds": round(stats["sample_seconds"], 3),
        "completions_per_s": round(stats["completions"] / per_s, 1),
        "completion_tokens_per_s": round(stats["completion_tokens"] / per_s, 1),
        "completions_per_probe_s": round(stats["completions"] / max(t_probe, 1e-9), 1),
        "rollout_seconds": round(t_rollouts, 3), "probe_seconds": round(t_probe, 3),
        "wall_seconds": round(time.perf_counter() - t_start, 3), "workers": s.workers,
        "gate": None if st.gate_model is None else {
            "name": st.gate_spec.name, "tau": st.gate_spec.tau, "block_size": st.gate_spec.params.block_size,
            "model": st.gate_path, "source": st.gate_spec.source or "command line"},
        "run_dir": s.run_dir or None, "device": str(st.device), "threads": torch.get_num_threads(),
    }


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
