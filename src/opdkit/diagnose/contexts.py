"""Teachers of ``opdkit diagnose``: a model plus a context (opdkit extension, docs/methods.md §8; §6 asks which
context should serve as the supervisory signal in self-distillation).

A ``--teacher`` entry is ``MODEL`` (the student's prompt), ``self:CONTEXT`` (the diagnosed student itself,
under a privileged context) or ``MODEL:PRESET``. ``CONTEXT`` is a preset of
:data:`opdkit.runtime.prompts.CONTEXT_PRESETS` (``solution``, ``answer``, ``hint``) or a template using
``{problem}``, ``{answer}``, ``{solution}``, ``{hint}``. The teacher then scores the same student tokens under
its own prompt; only its prompt differs (:func:`teacher_prompt_ids`). :func:`compare` gives the per-teacher
comparison table of the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opdkit.rollout.preflight import check_context
from opdkit.runtime.prompts import CONTEXT_PRESETS, format_teacher_prompt, resolve_context
from opdkit.runtime.settings import ConfigError

SELF = "self"
#: methods whose alignment the context comparison reports (the expected OPD direction and the rollout's own)
COMPARED = ("reverse_kl", "opd_sampled")


@dataclass(frozen=True)
class TeacherSpec:
    """One ``--teacher`` entry: its name in the report, the model ('self' = the student) and its context."""

    name: str
    model: str
    context: str = ""  # a preset name or a template ("" = the student's prompt)


def parse_teacher(spec: str) -> TeacherSpec:
    """``"miniature"`` / ``"path"`` / ``"self:solution"`` / ``"path:answer"`` -> :class:`TeacherSpec`."""
    spec = spec.strip()
    model, sep, ctx = spec.partition(":")
    if model == SELF:
        if not ctx:
            raise ConfigError("teacher 'self' needs a context, e.g. self:solution (presets: "
                              f"{', '.join(CONTEXT_PRESETS)}); under the student's prompt it is the student")
        return TeacherSpec(spec, SELF, ctx)
    if not (sep and ctx in CONTEXT_PRESETS):
        model, ctx = spec, ""
    base = Path(model).name or model  # a path is named by its last part ("miniature" stays)
    return TeacherSpec(f"{base}:{ctx}" if ctx else base, model, ctx)


def parse_teachers(specs: list[str]) -> list[TeacherSpec]:
    """Parse every entry; names are made unique (``name#2``) when an entry repeats."""
    out, names = [], set()
    for s in specs:
        t = parse_teacher(s)
        name, i = t.name, 2
        while name in names:
            name, i = f"{t.name}#{i}", i + 1
        names.add(name)
        out.append(TeacherSpec(name, t.model, t.context))
    return out


def resolved_contexts(specs: list[TeacherSpec], problems, student_template: str, *, chain: bool,
                      hint_lines: int) -> dict[str, str]:
    """``{name: template}`` for teachers with a context, each checked against the data first (preflight)."""
    out = {}
    for t in specs:
        if t.context:
            try:
                out[t.name] = resolve_context(t.context, chain=chain)
            except ValueError as e:
                raise ConfigError(f"--teacher {t.name}: {e}") from None
            check_context(problems, out[t.name], student_template, hint_lines=hint_lines,
                          what=f"--teacher {t.name}")
    return out


def teacher_prompt_ids(tok, problem, contexts: dict[str, str], *, hint_lines: int, chat: bool) -> dict:
    """``{name: prompt ids}`` of one problem for every teacher with a context."""
    return {n: format_teacher_prompt(tok, problem, c, hint_lines=hint_lines, chat_template=chat)
            for n, c in contexts.items()}


def compare(agg: dict, methods: list[str]) -> list[dict]:
    """One row per teacher x compared method: mean alignment on correct / incorrect rollouts, per token (pooled
    nodes) and per rollout, and the mean over questions of their pooled-node mean."""
    rows = []
    for teacher, a in agg.items():
        for m in [m for m in COMPARED if m in methods]:
            bs = a["by_split"]
            qs = [q["methods"][m]["mean"] for q in a["per_question"].values() if q["methods"][m]["n"]]
            rows.append({"teacher": teacher, "method": m,
                         "token": {s: bs[s]["methods"][m]["node"] for s in ("correct", "incorrect")},
                         "rollout": {s: bs[s]["methods"][m]["rollout"] for s in ("correct", "incorrect")},
                         "question_mean": round(sum(qs) / len(qs), 6) if qs else None, "questions": len(qs)})
    return rows
