"""Token ids the loss config needs, read from the student's tokenizer (special-token mask §2.4, NewlineSpan §4).

Same rules as opdkit's own trainer: a special token is one vocabulary entry (or text that encodes to exactly
one id); newline ids are every id whose decoded text contains ``"\\n"``
(:func:`opdkit.rollout.preflight.newline_token_ids`).
"""

from __future__ import annotations

import functools

from opdkit.integrations.verl.guards import VerlIntegrationError
from opdkit.rollout.preflight import newline_token_ids as _newline_token_ids


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer at ``path`` (local folder or hub id); trust_remote_code stays off."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def token_ids(tok, tokens: list[str]) -> list[int]:
    """One id per token string; raises if a string is not a single token of ``tok``."""
    ids = []
    for t in tokens:
        tid = tok.convert_tokens_to_ids(t)
        if tid is None or tid == tok.unk_token_id:
            enc = tok(t, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise VerlIntegrationError(f"distillation.distillation_loss.special_tokens: {t!r} is not a single "
                                           "token of this tokenizer")
            tid = enc[0]
        ids.append(int(tid))
    return ids


def newline_token_ids(tok) -> list[int]:
    """Sorted ids whose decoded text contains a newline (NewlineSpan block boundaries)."""
    return _newline_token_ids(tok)
