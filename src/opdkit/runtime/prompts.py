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
    text = prompt_text(problem, template)
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
