"""The rollout batch: what one round of sampling produces and what every later stage reads.

Layout: prompts left-padded to ``P`` columns, responses right-padded to ``T`` columns, so the model
input is ``cat(prompt_ids_BP, response_ids_BT)`` and response position ``t`` is predicted by the
hidden state at column ``P − 1 + t``. Position ids follow the attention mask (``cumsum − 1``), as
``model.generate`` does, so a recomputation matches the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class RolloutBatch:
    """One rollout batch (B = prompts × samples per prompt rows).

    prompt_ids_BP / prompt_mask_BP: left-padded prompts.
    response_ids_BT / response_mask_BT: right-padded responses; the mask is 1 on real response tokens
        (the EOS token included when the response stopped on it).
    logp_old_BT: behaviour log-probs ``log π_old(y_t | c_t)`` at temperature 1, recorded at sampling.
    group_ids_B: rows sampled from the same prompt share an id; prompt_index_B: row of the data set.
    stop_reasons: "eos" or "length" per row.
    Teacher fields (filled by teacher scoring): teacher_logp_BT, teacher_lse_BT, teacher_topk_ids_BTK,
    teacher_topk_logits_BTK. rewards_B: verifier rewards (0/1) when computed. advantage_BT: an advantage that
    replaces ``log q − log π_old`` in the OPD surrogate (SG-OPD §5.1), computed once per rollout batch
    because it needs whole prompt groups. answers: reference answers.
    """

    prompt_ids_BP: torch.Tensor
    prompt_mask_BP: torch.Tensor
    response_ids_BT: torch.Tensor
    response_mask_BT: torch.Tensor
    logp_old_BT: torch.Tensor
    group_ids_B: torch.Tensor
    prompt_index_B: torch.Tensor
    stop_reasons: list[str] = field(default_factory=list)
    teacher_logp_BT: torch.Tensor | None = None
    teacher_lse_BT: torch.Tensor | None = None
    teacher_topk_ids_BTK: torch.Tensor | None = None
    teacher_topk_logits_BTK: torch.Tensor | None = None
    rewards_B: torch.Tensor | None = None
    advantage_BT: torch.Tensor | None = None
    answers: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.response_ids_BT.shape[0]

    @property
    def response_lengths_B(self) -> torch.Tensor:
        return self.response_mask_BT.sum(dim=-1)

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids_BP, self.response_ids_BT], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask_BP, self.response_mask_BT], dim=1).long()

    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask().cumsum(dim=1) - 1).clamp_min(0)

    def select(self, idx: torch.Tensor | list[int] | slice) -> RolloutBatch:
        """Rows ``idx`` (tensor fields indexed, list fields likewise), trimmed of all-padding columns."""
        if isinstance(idx, slice):
            idx = list(range(self.size))[idx]
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx_t.to(v.device)]
            elif isinstance(v, list) and v:
                out[f.name] = [v[i] for i in idx_t.tolist()]
            else:
                out[f.name] = v
        return replace(self, **out).trimmed()

    def trimmed(self) -> RolloutBatch:
        """Drop prompt columns that are padding in every row, and response columns likewise."""
        p_keep = int(self.prompt_mask_BP.sum(dim=1).max().item()) if self.size else 0
        t_keep = int(self.response_mask_BT.sum(dim=1).max().item()) if self.size else 0
        P, T = self.prompt_ids_BP.shape[1], self.response_ids_BT.shape[1]
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor) or v.dim() < 2:
                continue
            if f.name.startswith("prompt_"):
                out[f.name] = v[:, P - p_keep:]
            elif v.shape[1] == T and f.name != "prompt_index_B":
                out[f.name] = v[:, :t_keep]
        return replace(self, **out)

    def to(self, device: torch.device | str) -> RolloutBatch:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def num_tokens(self) -> int:
        return int(self.response_mask_BT.sum().item())

    def response_token_ids(self) -> list[list[int]]:
        """Each row's response ids without padding (the EOS token included when the row stopped on it)."""
        ids_BT, mask_BT = self.response_ids_BT.cpu(), self.response_mask_BT.cpu().bool()
        return [r[m].tolist() for r, m in zip(ids_BT, mask_BT)]

    def decode(self, tokenizer) -> list[str]:
        """Response texts, special tokens skipped (what the verifier grades)."""
        return tokenizer.batch_decode(self.response_token_ids(), skip_special_tokens=True)
