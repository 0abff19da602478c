"""Segmenters for blockwise policy-drift gating (docs/methods.md §4 step 2; arXiv 2606.24084).

Every segmenter maps a response-aligned ``[B,T]`` batch (position 0 = first response token) to
``segment_ids_BT`` (int64):

- ``-1`` wherever ``mask_BT == 0`` (prompt / padding / masked special tokens);
- otherwise ``b·T + j`` for row ``b``, where ``j ∈ [0, T)`` is the segment's index inside its row.
  Ids of different rows therefore never collide (row ``b`` owns ``[b·T, (b+1)·T)``), and a row's ids
  increase along the row. Ids are *not* contiguous over the batch: a consumer that needs dense indices
  uses ``torch.unique(ids, return_inverse=True)`` (as :mod:`opdkit.gates.drift` does).

Positions, not valid-token counts, define segment extents (Block-n is "contiguous positions counted
from the first response token"), so a masked hole inside a response (e.g. special-token masking, §2.4)
occupies its position but gets id ``-1``; the other tokens of its segment keep the segment's id.
"""

from __future__ import annotations

import math

import torch


def _valid(mask_BT: torch.Tensor) -> torch.Tensor:
    if mask_BT.dim() != 2:
        raise ValueError(f"mask_BT must be 2-D [B,T], got shape {tuple(mask_BT.shape)}")
    return mask_BT != 0


def block_segments(mask_BT: torch.Tensor, size: int) -> torch.Tensor:
    """Block-n segments (§4 step 2, arXiv 2606.24084): block ``n`` = positions ``[n·size, (n+1)·size − 1]``.

    Shapes: ``mask_BT`` [B,T] (nonzero = valid response token) → ``segment_ids_BT`` [B,T] int64.
    ``id = b·T + ⌊t / size⌋`` on valid positions, ``-1`` elsewhere; the last block of a row may be
    partial (it ends with the row's last valid token).
    """
    if int(size) < 1:
        raise ValueError(f"block size must be >= 1, got {size}")
    valid_BT = _valid(mask_BT)
    B, T = valid_BT.shape
    dev = valid_BT.device
    pos_T = torch.arange(T, device=dev, dtype=torch.long)
    ids_BT = torch.arange(B, device=dev, dtype=torch.long)[:, None] * T + (pos_T // int(size))[None, :]
    return torch.where(valid_BT, ids_BT, torch.full_like(ids_BT, -1))


def token_segments(mask_BT: torch.Tensor) -> torch.Tensor:
    """Token control (§4 step 2, **ours**): every valid token is its own segment (Block-1).

    Shapes: ``mask_BT`` [B,T] → ``segment_ids_BT`` [B,T] int64, ``id = b·T + t``, ``-1`` on invalid.
    """
    return block_segments(mask_BT, 1)


def sequence_segments(mask_BT: torch.Tensor) -> torch.Tensor:
    """Sequence control (§4 step 2, **ours**): one segment per row (Block-∞).

    Shapes: ``mask_BT`` [B,T] → ``segment_ids_BT`` [B,T] int64, ``id = b·T``, ``-1`` on invalid.
    """
    return block_segments(mask_BT, max(int(mask_BT.shape[-1]), 1))


def newline_segments(response_ids_BT: torch.Tensor, mask_BT: torch.Tensor,
                     newline_token_ids: list[int] | tuple[int, ...] | torch.Tensor, min_len: int = 16,
                     max_len: int = 128, fallback: int = 64) -> torch.Tensor:
    """NewlineSpan segments (§4 step 2, arXiv 2606.24084; lengths 16/128/64 are **ours**).

    Shapes: ``response_ids_BT`` [B,T] int token ids, ``mask_BT`` [B,T] → ``segment_ids_BT`` [B,T] int64.

    Per row, with ``L`` = (last valid position) + 1 and lengths counted in positions:

    1. *Cut* after every valid token whose id is in ``newline_token_ids`` (the caller decides which
       token ids' text contains a newline). A cut after the row's last valid token is the row end.
    2. *Merge* spans shorter than ``min_len`` into the NEXT span: scanning left to right, a cut is kept
       iff the span since the previously kept cut (or position 0) has at least ``min_len`` positions.
       If the final span (last kept cut → ``L``) is shorter than ``min_len``, it is merged into the
       PREVIOUS span (that cut is dropped); a row whose total length is below ``min_len`` is one span.
    3. *Split* each span of length ``len > max_len`` into ``P = ⌈len / max_len⌉`` near-equal parts:
       the token at offset ``o`` in the span goes to part ``⌊o·P / len⌋`` (part sizes ⌊len/P⌋ or ⌈len/P⌉).
    4. A row with no valid newline token uses :func:`block_segments` with ``size=fallback``.

    Ids follow the module scheme ``b·T + j`` (``j`` = segment index in its row), ``-1`` on invalid.

    Vectorized (no loop over rows or positions): the greedy merge of step 2 is "next kept cut = first
    cut ≥ current + min_len", a pointer chain over cut candidates; the chain reachable from each row's
    start is found by pointer doubling, ``⌈log2(#cuts + 2)⌉`` vectorized rounds.
    """
    if int(min_len) < 0 or int(max_len) < 1 or int(fallback) < 1:
        raise ValueError(f"need min_len >= 0, max_len >= 1, fallback >= 1; "
                         f"got {min_len}, {max_len}, {fallback}")
    valid_BT = _valid(mask_BT)
    if response_ids_BT.shape != valid_BT.shape:
        raise ValueError(f"response_ids_BT {tuple(response_ids_BT.shape)} and mask_BT "
                         f"{tuple(valid_BT.shape)} differ in shape")
    B, T = valid_BT.shape
    dev = valid_BT.device
    if B == 0 or T == 0:
        return torch.full((B, T), -1, dtype=torch.long, device=dev)
    min_len, max_len = int(min_len), int(max_len)
    nl_ids = torch.as_tensor(list(newline_token_ids) if not torch.is_tensor(newline_token_ids)
                             else newline_token_ids, dtype=torch.long, device=dev).reshape(-1)
    is_nl_BT = torch.isin(response_ids_BT.to(torch.long), nl_ids) & valid_BT
    has_nl_B = is_nl_BT.any(dim=1)

    pos_T = torch.arange(T, device=dev, dtype=torch.long)
    row_B = torch.arange(B, device=dev, dtype=torch.long)
    L_B = (valid_BT.long() * (pos_T + 1)).amax(dim=1)  # last valid position + 1 (0: empty row)
    # Cut candidates: boundary e = p + 1 after a valid newline at p, strictly inside the row (e < L).
    cand_BT = is_nl_BT & ((pos_T + 1)[None, :] < L_B[:, None])
    cand_b, cand_p = cand_BT.nonzero(as_tuple=True)  # row-major, hence sorted by key below
    W = T + 1  # key = b·W + boundary, boundary ∈ [0, T]: sorted, rows never overlap
    cand_key = cand_b * W + cand_p + 1
    M = cand_key.numel()

    # Nodes: candidates 0..M-1, row starts M..M+B-1, END = M+B (absorbing).
    node_key = torch.cat([cand_key, row_B * W])
    node_row = torch.cat([cand_b, row_B])
    # first candidate >= node + min_len (>= node + 1: a span is never empty)
    tgt = torch.searchsorted(cand_key, node_key + max(min_len, 1))
    if M > 0:
        same_row = cand_b[tgt.clamp(max=M - 1)] == node_row
        ok = (tgt < M) & same_row
    else:
        ok = torch.zeros_like(tgt, dtype=torch.bool)
    END = M + B
    nxt = torch.cat([torch.where(ok, tgt, torch.full_like(tgt, END)),
                     torch.tensor([END], device=dev, dtype=torch.long)])
    reached = torch.zeros(M + B + 1, dtype=torch.bool, device=dev)
    reached[M:M + B] = True
    for _ in range(max(1, math.ceil(math.log2(M + 2)))):
        # invariant: reached = nodes at distance < 2^r from a row start; nxt = next^(2^r)
        reached[nxt[reached]] = True
        nxt = nxt[nxt]
    kept = reached[:M] & (L_B[cand_b] - (cand_p + 1) >= min_len)  # drop a short final span's cut

    start_BT = torch.zeros(B, T, dtype=torch.bool, device=dev)
    start_BT[:, 0] = True
    start_BT[cand_b[kept], cand_p[kept] + 1] = True
    in_ext_BT = pos_T[None, :] < L_B[:, None]
    span_BT = torch.cumsum(start_BT.long(), dim=1) - 1
    span_start_BT = torch.cummax(torch.where(start_BT, pos_T[None, :].expand(B, T),
                                             torch.zeros_like(span_BT)), dim=1).values
    span_gid_BT = row_B[:, None] * T + span_BT
    span_len = torch.zeros(B * T, dtype=torch.long, device=dev)
    span_len.index_add_(0, span_gid_BT[in_ext_BT], torch.ones_like(span_gid_BT[in_ext_BT]))
    len_BT = span_len[span_gid_BT].clamp(min=1)
    off_BT = pos_T[None, :] - span_start_BT
    parts_BT = (len_BT + max_len - 1) // max_len
    part_BT = off_BT * parts_BT // len_BT
    prev_part_BT = torch.cat([torch.full_like(part_BT[:, :1], -1), part_BT[:, :-1]], dim=1)
    seg_start_BT = in_ext_BT & ((off_BT == 0) | (part_BT != prev_part_BT))
    local_BT = torch.cumsum(seg_start_BT.long(), dim=1) - 1
    ids_BT = row_B[:, None] * T + local_BT

    ids_BT = torch.where(has_nl_B[:, None], ids_BT, block_segments(valid_BT, fallback))
    return torch.where(valid_BT, ids_BT, torch.full_like(ids_BT, -1))
