"""Pure gate math (torch only): blockwise policy-drift gates (§4) and the SG-OPD sign gate (§5.1)."""

from opdkit.gates.drift import (
    BLOCK_STATISTICS,
    GATE_NORMALIZATIONS,
    drift_gate,
    drift_stats,
    get_gate_normalization,
    normalize_gate,
    segment_scores,
)
from opdkit.gates.registry import SEGMENTERS, SegmentParams, get_segmenter
from opdkit.gates.segments import block_segments, newline_segments, sequence_segments, token_segments
from opdkit.gates.sign import sign_agreement, sign_consistency_advantage, verifier_advantage

__all__ = [
    "BLOCK_STATISTICS", "GATE_NORMALIZATIONS", "SEGMENTERS", "SegmentParams", "block_segments", "drift_gate",
    "drift_stats", "get_gate_normalization", "get_segmenter",
    "newline_segments", "normalize_gate", "segment_scores", "sequence_segments", "sign_agreement",
    "sign_consistency_advantage", "token_segments", "verifier_advantage",
]
