"""Training prompts: load problems, tokenize prompts, iterate epochs with a resumable cursor.

Prompt formatting is :func:`opdkit.runtime.prompts.format_prompt`, the same as ``opdkit eval`` uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opdkit.rollout.preflight import check_context
from opdkit.runtime.benchmarks import is_chain, load_benchmark
from opdkit.runtime.problems import Problem, load_hf_problems, load_jsonl_problems
from opdkit.runtime.prompts import PromptSettings, chat_setting, format_prompt, format_teacher_prompt, resolve_context


def load_problems(train_file: str = "", *, data_dir: str = "", hf_dataset: str = "", hf_split: str = "train",
                  problem_field: str = "problem", answer_field: str = "answer") -> list[Problem]:
    """Problems from a JSON Lines path, a name (``dapo17k``, ``math500``, ``chain12``, ...; see
    :func:`opdkit.runtime.benchmarks.load_benchmark`) or a HF dataset."""
    if hf_dataset:
        return load_hf_problems(hf_dataset, split=hf_split, problem_field=problem_field,
                                answer_field=answer_field)
    if train_file.endswith(".jsonl") or "/" in train_file:
        return load_jsonl_problems(train_file, problem_field=problem_field, answer_field=answer_field)
    return load_benchmark(train_file, data_dir=data_dir or None)


@dataclass
class PromptSource:
    """Tokenized prompts served in seeded, shuffled epochs; ``state()`` / ``load_state()`` resume exactly.

    ``dropped`` counts prompts longer than ``max_prompt_tokens``. ``teacher_ids``: the teacher's prompt of
    each problem under ``teacher.context`` (None without a context: the teacher sees the student's prompt).
    """

    prompt_ids: list[list[int]]
    answers: list[str]
    indices: list[int]
    seed: int = 0
    shuffle: bool = True
    dropped: int = 0
    epoch: int = 0
    cursor: int = 0
    _order: list[int] = field(default_factory=list, repr=False)
    teacher_ids: list[list[int]] | None = None

    @classmethod
    def build(cls, problems: list[Problem], tokenizer, *, template: str, chat_template: str | bool,
              max_prompt_tokens: int, seed: int = 0, shuffle: bool = True, context: str = "",
              hint_lines: int = 2) -> PromptSource:
        """Tokenize every problem (``chat_template``: on / off / auto, see :mod:`opdkit.runtime.prompts`), and
        its teacher prompt under ``context`` (checked first by :func:`opdkit.rollout.preflight.check_context`)."""
        chain = is_chain(problems)
        template, chat_template = PromptSettings(template, chat_setting(chat_template)).resolve(chain=chain)
        if context:
            context = resolve_context(context, chain=chain)
            check_context(problems, context, template, hint_lines=hint_lines)
        ids, answers, idx, t_ids, dropped = [], [], [], [], 0
        for i, p in enumerate(problems):
            toks = format_prompt(tokenizer, p.problem, template=template, chat_template=chat_template)
            if len(toks) > max_prompt_tokens:
                dropped += 1
                continue
            ids.append(toks)
            answers.append(p.answer)
            idx.append(i)
            if context:
                t_ids.append(format_teacher_prompt(tokenizer, p, context, hint_lines=hint_lines,
                                                   chat_template=chat_template))
        if not ids:
            raise ValueError(f"no prompt fits data.max_prompt_tokens = {max_prompt_tokens} "
                             f"({dropped} dropped); raise it")
        return cls(ids, answers, idx, seed=seed, shuffle=shuffle, dropped=dropped,
                   teacher_ids=t_ids if context else None)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g).tolist()

    def next(self, n: int) -> list[int]:
        """Positions (into ``prompt_ids``) of the next ``n`` prompts, crossing epochs as needed."""
        out = []
        while len(out) < n:
            if not self._order:
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self) - self.cursor)
            out += self._order[self.cursor:self.cursor + take]
            self.cursor += take
            if self.cursor >= len(self):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, []
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch) if self.cursor else []
