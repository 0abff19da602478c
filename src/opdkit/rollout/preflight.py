"""Tokenizer pre-flight checks before distillation, and newline token ids for NewlineSpan blocks.

OPD scores the *student's* token ids with the teacher (docs/methods.md §0: ``lq_t = log q(y_t | c_t)``), so
both models must give every id the same meaning. :func:`check_tokenizers` verifies that and returns the
vocabulary size to score on. Embeddings padded beyond the tokenizer (e.g. 151,936 vs 152,064 rows)
are fine: the rows past the tokenizer are never sampled, and scoring on the shared ids ignores them.
"""

from __future__ import annotations

from opdkit.runtime.prompts import context_values, privileged_fields, prompt_text

CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
_MAX_LISTED = 10


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenizers disagree in a way that makes teacher scores meaningless."""


def _id_to_token(tok) -> dict[int, str]:
    """``id -> token string`` for every id of the tokenizer (base vocabulary and added tokens)."""
    return {i: t for t, i in tok.get_vocab().items()}


def _special(tok, name: str) -> tuple[str | None, int | None]:
    return getattr(tok, f"{name}_token", None), getattr(tok, f"{name}_token_id", None)


def check_tokenizers(student_tok, teacher_tok, *, student_vocab_size: int, teacher_vocab_size: int) -> int:
    """Check that the teacher can score the student's tokens; return the shared vocabulary size.

    Args:
        student_tok / teacher_tok: Hugging Face tokenizers.
        student_vocab_size / teacher_vocab_size: rows of each model's LM head (``config.vocab_size``),
            which may exceed the tokenizer length (padded embeddings).

    Returns ``min(student_vocab_size, teacher_vocab_size)``: pass it as ``vocab_limit`` to teacher
    scoring so both distributions live on the same ids.

    Raises :class:`TokenizerMismatchError` naming the first differing ids (with both strings), or the
    differing EOS / pad / BOS / chat special token (``<|im_start|>``, ``<|im_end|>``), when a tokenizer
    has a token at an id the other model does not have, or when the models are smaller than their
    tokenizers.
    """
    shared = min(int(student_vocab_size), int(teacher_vocab_size))
    advice = ("OPD scores the student's token ids with the teacher, so both must share one tokenizer: "
              "pick a teacher from the student's model family (e.g. Qwen3 with Qwen3), or load both "
              "with the same tokenizer files.")
    problems: list[str] = []
    for name in ("eos", "pad", "bos"):
        s, t = _special(student_tok, name), _special(teacher_tok, name)
        if s != t:
            problems.append(f"{name} token differs: student {s[0]!r} (id {s[1]}) vs teacher {t[0]!r} (id {t[1]})")
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    for special in CHAT_SPECIAL_TOKENS:
        s_id, t_id = s_vocab.get(special), t_vocab.get(special)
        if (s_id is not None or t_id is not None) and s_id != t_id:
            problems.append(f"chat token {special!r} differs: student id {s_id} vs teacher id {t_id}")

    for who, tok, n_model in (("student", student_tok, student_vocab_size), ("teacher", teacher_tok,
                                                                             teacher_vocab_size)):
        hi = max(tok.get_vocab().values(), default=-1)
        if hi >= n_model:
            raise ValueError(f"the {who} tokenizer has id {hi} but the {who} model has only {n_model} "
                             "vocabulary rows; pass the model's config.vocab_size and check the pairing")

    s_map, t_map = _id_to_token(student_tok), _id_to_token(teacher_tok)
    diffs = [i for i in sorted(set(s_map) | set(t_map)) if i < shared and s_map.get(i) != t_map.get(i)]
    beyond = sorted(i for i in s_map if i >= shared)
    if diffs:
        listed = ", ".join(f"id {i}: student {s_map.get(i)!r} vs teacher {t_map.get(i)!r}"
                           for i in diffs[:_MAX_LISTED])
        more = f" (and {len(diffs) - _MAX_LISTED} more)" if len(diffs) > _MAX_LISTED else ""
        problems.append(f"{len(diffs)} of the {shared} shared ids map to different tokens: {listed}{more}")
    if beyond:
        problems.append(f"the student tokenizer has {len(beyond)} tokens at ids >= {shared} that the teacher "
                        f"cannot score, e.g. id {beyond[0]}: {s_map[beyond[0]]!r}")
    if problems:
        if not diffs and not beyond:  # same vocabulary, different special-token settings
            advice = ("The vocabularies agree; only special-token settings differ (e.g. a base vs an instruct "
                      "checkpoint of one family). Set the same eos_token / pad_token / bos_token on both "
                      "tokenizers (and the same chat template) before distilling.")
        raise TokenizerMismatchError("student / teacher tokenizer mismatch:\n- " + "\n- ".join(problems)
                                     + "\n" + advice)
    return shared


def newline_token_ids(tokenizer) -> list[int]:
    """Sorted ids whose decoded text contains ``"\\n"`` (NewlineSpan block boundaries, docs/methods.md §4).

    Each id is decoded on its own once (``batch_decode`` over ``[[id] for id in vocab]``, done in Rust
    by fast tokenizers: about a second for a 150k vocabulary), so byte-level tokens such as ``"Ċ"`` or
    ``".ĊĊ"`` and byte-fallback tokens such as ``"<0x0A>"`` are all found. Cache the result.
    """
    ids = sorted(tokenizer.get_vocab().values())
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [i for i, text in zip(ids, texts) if "\n" in text]


class ContextError(ValueError):
    """A teacher context that the data cannot fill, or that leaks into the student's prompt."""


#: Privileged text shorter than this many characters (e.g. an answer "42") is not searched for in the student's
#: prompt: short strings occur in problems by chance.
LEAK_MIN_CHARS = 8


def check_context(problems, context: str, student_template: str, *, hint_lines: int = 2,
                  what: str = "teacher.context") -> None:
    """Refuse a teacher context (a resolved template, see :func:`opdkit.runtime.prompts.resolve_context`)
    before any model runs: every field it uses must be in every row, and nothing privileged may reach the
    student's prompt.

    Raises :class:`ContextError` (one line, saying what to change) when rows lack a field the context uses
    (e.g. ``{solution}`` on DAPO-Math-17k, which has answers only), when the student's prompt template
    uses a privileged field (``{answer}``, ``{solution}``, ``{hint}``), or when a row's privileged text of
    at least :data:`LEAK_MIN_CHARS` characters appears verbatim in its student prompt.
    """
    used = privileged_fields(context)
    in_student = [f for f in ("answer", "solution", "hint") if "{" + f + "}" in student_template]
    if in_student:
        raise ContextError(f"the student's prompt template uses {{{in_student[0]}}}, teacher-only information: "
                           f"remove it from data.prompt_template (it belongs in {what})")
    for f in used:
        missing = [p.id for p in problems if not context_values(p, hint_lines)[f]]
        if missing:
            source = "a 'solution' field" if f in ("solution", "hint") else f"an {f!r}"
            raise ContextError(f"{what} uses {{{f}}} but {len(missing)} of {len(problems)} problems lack "
                               f"{source} (first: {missing[0]!r}); use a context without it (e.g. "
                               f"{what}=answer) or data whose rows carry {source}")
    for p in problems:
        student = prompt_text(p.problem, student_template)
        values = context_values(p, hint_lines)
        for f in used:
            if len(values[f].strip()) >= LEAK_MIN_CHARS and values[f].strip() in student:
                raise ContextError(f"{what}: the {f} of problem {p.id!r} appears in the student's own prompt, so "
                                   f"the context gives the teacher nothing the student lacks; check the data")
