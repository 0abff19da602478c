"""Gate segmentation parameters from a gate configuration (the trainer and ``opdkit diagnose --run`` share it)."""

from __future__ import annotations

from opdkit.gates.registry import SegmentParams
from opdkit.rollout.preflight import newline_token_ids


def segment_params(gate_cfg, tokenizer) -> SegmentParams:
    """:class:`SegmentParams` of a ``GateConfig`` (``opdkit.config``); newline ids only for the newline gate."""
    return SegmentParams(
        block_size=gate_cfg.block_size,
        newline_token_ids=tuple(newline_token_ids(tokenizer)) if gate_cfg.name == "newline" else (),
        newline_min_len=gate_cfg.newline_min_len, newline_max_len=gate_cfg.newline_max_len,
        newline_fallback=gate_cfg.newline_fallback)
