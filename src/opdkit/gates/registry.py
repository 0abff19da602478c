"""Registry of segmenters for drift gating (docs/methods.md §4 step 2): name -> one signature.

Every entry is ``fn(response_ids_BT, mask_BT, p: SegmentParams) -> segment_ids_BT``. The gate name
``none`` maps to ``None`` (no gating), so a trainer looks the name up once and never branches on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opdkit.gates.segments import block_segments, newline_segments, sequence_segments, token_segments


@dataclass(frozen=True)
class SegmentParams:
    block_size: int = 64
    newline_token_ids: tuple[int, ...] = ()
    newline_min_len: int = 16
    newline_max_len: int = 128
    newline_fallback: int = 64


Segmenter = Callable[[torch.Tensor, torch.Tensor, SegmentParams], torch.Tensor]

SEGMENTERS: dict[str, Segmenter | None] = {
    "none": None,
    "token": lambda ids, mask, p: token_segments(mask),
    "block": lambda ids, mask, p: block_segments(mask, p.block_size),
    "newline": lambda ids, mask, p: newline_segments(ids, mask, list(p.newline_token_ids),
                                                     min_len=p.newline_min_len, max_len=p.newline_max_len,
                                                     fallback=p.newline_fallback),
    "sequence": lambda ids, mask, p: sequence_segments(mask),
}


def get_segmenter(name: str) -> Segmenter | None:
    """The registered segmenter ``name`` (``None`` for ``none``); unknown names list the valid ones."""
    try:
        return SEGMENTERS[name]
    except KeyError:
        raise ValueError(f"unknown gate {name!r}; valid: {', '.join(SEGMENTERS)}") from None
