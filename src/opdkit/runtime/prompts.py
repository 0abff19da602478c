"""Prompt formatting, shared by training, evaluation and diagnosis (one template setting, one chat setting).

A prompt is ``template`` with ``{problem}`` replaced by the problem text (other braces stay literal),
optionally wrapped in the tokenizer's chat template with the generation prompt appended. The chat
setting is the same three-valued choice in every command (``--chat-template``, ``data.chat_template``):

* ``on``: wrap when the tokenizer has a chat template;
* ``off``: plain text;
* ``auto``: ``off`` for the CPU miniature's chain problems (its checkpoints are trained on plain
  ``problem + "\\n"``), else ``on``.

The default template follows the same rule: :data:`CHAIN_TEMPLATE` for chain problems, else
:data:`QWEN_MATH_TEMPLATE` (the Qwen math prompt the paper's setting uses).
"""

from __future__ import annotations

from dataclasses import dataclass

from opdkit.runtime.settings import F, check_choice

QWEN_MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
CHAIN_TEMPLATE = "{problem}\n"
CHAT_TEMPLATE_CHOICES = ("auto", "on", "off")


def check_template(template: str) -> str:
    if "{problem}" not in template:
        raise ValueError(f"prompt template {template!r} must contain {{problem}}")
    return template


def chat_setting(value: str | bool) -> str:
    """Normalise a chat-template setting: ``auto`` / ``on`` / ``off`` (booleans: True -> on, False -> off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat template setting {value!r} is not valid; choose one of "
                         f"{', '.join(CHAT_TEMPLATE_CHOICES)}")
    return value


@dataclass(frozen=True)
class PromptSettings:
    """How problems become prompts. ``template`` None or empty: the task's default (module docstring)."""

    template: str | None = F(None, "prompt text with {problem} (other braces literal); empty: the task's default")
    chat_template: str = F("auto", "wrap prompts in the tokenizer's chat template: auto (off for chain problems, "
                                   "else on), on, off")

    def validate(self, prefix: str = "prompt") -> PromptSettings:
        check_choice(f"{prefix}.chat_template", chat_setting(self.chat_template), CHAT_TEMPLATE_CHOICES)
        if self.template:
            check_template(self.template)
        return self

    def resolve(self, *, chain: bool) -> tuple[str, bool]:
        """``(template, wrap in the chat template)`` for chain problems or not."""
        template = self.template or (CHAIN_TEMPLATE if chain else QWEN_MATH_TEMPLATE)
        chat = chat_setting(self.chat_template)
        return check_template(template), (not chain if chat == "auto" else chat == "on")


def prompt_text(problem: str, template: str = "{problem}") -> str:
    """The user message: ``template`` with ``{problem}`` replaced (other braces are literal)."""
    return check_template(template).replace("{problem}", problem)


def format_prompt(tokenizer, problem: str, *, template: str = "{problem}", chat_template: bool = True) -> list[int]:
    """Token ids of the prompt: :func:`prompt_text`, inside the chat template if the tokenizer has one and
    ``chat_template`` is on (generation prompt appended)."""
    return encode_prompt(tokenizer, prompt_text(problem, template), chat_template=chat_template)


# --------------------------------------------------------------------------- teacher contexts
# opdkit extension (teacher context, docs/methods.md §8; 2605.10889 asks "which context should serve as the supervisory
# signal"): a teacher is a model plus a context, the prompt the teacher scores the student's response under.
# The student never sees it; only the teacher's prompt differs, the response tokens are the same.

#: Fields a context template may use; ``{hint}`` is built from the solution (:func:`hint_text`).
CONTEXT_FIELDS = ("problem", "answer", "solution", "hint")
_PRIVILEGED = ("answer", "solution", "hint")
_MATH_TAIL = "\nPlease reason step by step, and put your final answer within \\boxed{}."

#: Named contexts: name -> (template for the miniature's chain problems, template for math problems). The chain
#: templates put the privileged text before the problem so the prompt still ends as the student's does
#: ("problem\n", then the trace); the math ones follow the Qwen math prompt.
CONTEXT_PRESETS: dict[str, tuple[str, str]] = {
    "solution": ("{solution}\n{problem}\n",
                 "{problem}\n\nA reference solution:\n{solution}\n\nNow write your own solution." + _MATH_TAIL),
    "answer": ("answer: {answer}\n{problem}\n",
               "{problem}\n\nThe final answer is {answer}." + _MATH_TAIL),
    "hint": ("{hint}\n{problem}\n", "{problem}\n\nHint: {hint}" + _MATH_TAIL),
}


def resolve_context(context: str, *, chain: bool) -> str:
    """A preset name (:data:`CONTEXT_PRESETS`) -> its template for chain / math problems; a template unchanged.

    Raises ValueError when ``context`` is neither a preset nor a template using at least one field."""
    if context in CONTEXT_PRESETS:
        return CONTEXT_PRESETS[context][0 if chain else 1]
    if not context_fields(context):
        raise ValueError(f"teacher context {context!r} is neither a preset ({', '.join(CONTEXT_PRESETS)}) nor a "
                         f"template using {{{'}, {'.join(CONTEXT_FIELDS)}}}")
    return context


def context_fields(template: str) -> list[str]:
    """The :data:`CONTEXT_FIELDS` that ``template`` uses, in that order."""
    return [f for f in CONTEXT_FIELDS if "{" + f + "}" in template]


def privileged_fields(template: str) -> list[str]:
    """The fields of ``template`` the student's prompt does not have (answer, solution, hint)."""
    return [f for f in context_fields(template) if f in _PRIVILEGED]


def hint_text(solution: str, lines: int) -> str:
    """The first ``lines`` non-empty lines of ``solution`` (the ``{hint}`` field)."""
    return "\n".join([ln for ln in solution.splitlines() if ln.strip()][:lines])


def context_values(problem, hint_lines: int) -> dict[str, str | None]:
    """``{field: text or None}`` of a :class:`~opdkit.runtime.problems.Problem` (None: the row lacks it)."""
    sol = problem.solution
    return {"problem": problem.problem, "answer": problem.answer, "solution": sol,
            "hint": hint_text(sol, hint_lines) if sol else None}


def context_text(template: str, problem, hint_lines: int = 2) -> str:
    """``template`` with every field replaced (other braces literal); KeyError names a field the row lacks."""
    values = context_values(problem, hint_lines)
    text = template
    for f in context_fields(template):
        if not values[f]:
            raise KeyError(f"problem {problem.id!r} has no {f!r}")
        text = text.replace("{" + f + "}", values[f])
    return text


def encode_prompt(tokenizer, text: str, *, chat_template: bool = True) -> list[int]:
    """Token ids of a user message ``text``, inside the chat template if on and the tokenizer has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def format_teacher_prompt(tokenizer, problem, context: str, *, hint_lines: int = 2,
                          chat_template: bool = True) -> list[int]:
    """Token ids of the teacher's prompt: :func:`context_text` wrapped like the student's prompt."""
    return encode_prompt(tokenizer, context_text(context, problem, hint_lines), chat_template=chat_template)
