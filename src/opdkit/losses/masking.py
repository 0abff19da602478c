"""Special-token masking: docs/methods.md §2.4 (arXiv 2603.25562).

Axis names: B sequences, T positions, N configured token ids.
"""

from __future__ import annotations

import torch

__all__ = ["special_token_mask"]


def special_token_mask(
    response_ids_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    token_ids: list[int] | tuple[int, ...] | torch.Tensor,
) -> torch.Tensor:
    """Zero the mask at the first valid occurrence of each configured token in each row (§2.4,
    arXiv 2603.25562; theirs: ``<``, ``think``, ``<|im_end|>``, where student and teacher disagree
    for template reasons only).

    For each row b and each id in ``token_ids``: among positions with ``mask_BT != 0``, the first t with
    ``response_ids_BT[b,t] == id`` gets ``m_t = 0``. Later occurrences, masked positions and ids that do
    not occur are left unchanged. Vectorized over B, T and the ids.

    Args:
        response_ids_BT: ``[B,T]`` integer token ids.
        mask_BT: ``[B,T]`` response mask (any dtype; nonzero = valid).
        token_ids: ids to mask (list / tuple / tensor of ints; may be empty).

    Returns:
        ``[B,T]`` new mask, same dtype and device as ``mask_BT`` (the input is not modified).
    """
    if response_ids_BT.shape != mask_BT.shape:
        raise ValueError(f"shape mismatch: {tuple(response_ids_BT.shape)} vs {tuple(mask_BT.shape)}")
    ids_N = torch.as_tensor(token_ids, dtype=response_ids_BT.dtype, device=response_ids_BT.device).reshape(-1)
    if ids_N.numel() == 0:
        return mask_BT.clone()
    valid_BT = mask_BT != 0
    hit_BTN = (response_ids_BT[..., None] == ids_N) & valid_BT[..., None]
    first_BTN = hit_BTN & (torch.cumsum(hit_BTN.to(torch.int32), dim=1) == 1)
    first_BT = first_BTN.any(dim=-1)
    return torch.where(first_BT, torch.zeros_like(mask_BT), mask_BT)
