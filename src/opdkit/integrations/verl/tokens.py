"""Token ids the loss config needs, read from the student's tokenizer (special-token mask §2.4, NewlineSpan §4).

Same rules as opdkit's own trainer: a special token is one vocabulary entry (or text that encodes to exactly
one id); newline ids are every id whose decoded text contains ``"\\n"``
(:func:`opdkit.rollout.preflight.newline_token_ids`).
"""

from __future__ import annotations

import functools

from opdkit.integrations.verl.guards import VerlIntegrationError
from opdkit.rollout.preflight import newline_token_ids as _newline_token_ids
from opdkit.runtime.models import load_tokenizer as _load_tokenizer
from opdkit.runtime.models import single_token_ids


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer at ``path`` (local folder or hub id; :func:`opdkit.runtime.models.load_tokenizer`,
    trust_remote_code off), cached: verl builds the loss config once per worker and role."""
    return _load_tokenizer(path)


def token_ids(tok, tokens: list[str]) -> list[int]:
    """One id per token string (:func:`opdkit.runtime.models.single_token_ids`), as a verl config error."""
    try:
        return single_token_ids(tok, tokens, field="distillation.distillation_loss.special_tokens")
    except ValueError as e:
        raise VerlIntegrationError(str(e)) from None


def newline_token_ids(tok) -> list[int]:
    """Sorted ids whose decoded text contains a newline (NewlineSpan block boundaries)."""
    return _newline_token_ids(tok)
