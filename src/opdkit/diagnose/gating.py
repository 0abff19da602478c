"""Drift-gate weights on a diagnosed rollout (docs/methods.md §4 applied to §6's view; arXiv 2606.24084).

The diagnosed student is the behaviour policy ``π_old`` (its log-probs are recorded when the rollout is
sampled). A second student ``π_θ`` (a training run's ``final/`` weights, or any checkpoint given with
``--gate-model``) supplies ``lp_t``; the gate is then exactly the trainer's: ``δ_t = lp_t − lp_old_t``,
segments from the run's gate settings, ``g_b = exp(−τ |s_b|)``, mean-normalized per sequence (the
trainer's ``batch`` scope needs the whole optimizer batch, which a diagnosis does not have).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from opdkit.gates import drift_gate, get_segmenter, normalize_gate
from opdkit.gates.registry import SegmentParams
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.scoring import response_logprobs


@dataclass(frozen=True)
class GateSpec:
    """Which gate to show: segmenter ``name`` (token, block, newline, sequence), its parameters, τ."""

    name: str = "block"
    tau: float = 1.0
    params: SegmentParams = SegmentParams()
    source: str = ""  # where the settings came from (for the report)


def gate_spec_from_run(run_dir: str | Path, tokenizer, *, fallback: GateSpec) -> GateSpec:
    """The gate settings of a training run (``RUN_DIR/config.yaml``); ``fallback`` when it used none."""
    from opdkit.config import load_config
    from opdkit.runtime.gate import segment_params

    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        return fallback
    cfg = load_config(cfg_path, need_models=False)
    g = cfg.gate
    if g.name == "none":
        return GateSpec(fallback.name, fallback.tau, fallback.params,
                        f"{cfg_path} (run used no gate; showing {fallback.name})")
    return GateSpec(g.name, g.tau, segment_params(g, tokenizer), str(cfg_path))


def run_gate_model(run_dir: str | Path) -> Path | None:
    """``RUN_DIR/final`` when it holds a saved model, else None."""
    final = Path(run_dir) / "final"
    return final if (final / "config.json").is_file() else None


@torch.no_grad()
def rollout_gates(gate_model, batch: RolloutBatch, spec: GateSpec) -> torch.Tensor:
    """Normalized gate ``g̃_BT`` (float32, CPU, 0 on padding) for the rows of ``batch`` (needs ``logp_old_BT``)."""
    segmenter = get_segmenter(spec.name)
    if segmenter is None:
        raise ValueError("gate 'none' has no weights; pick token, block, newline or sequence")
    dev = next(gate_model.parameters()).device
    b = batch.to(dev)
    lp_BT = response_logprobs(gate_model, b).logp_BT.float()
    mask_BT = b.response_mask_BT
    seg_BT = segmenter(b.response_ids_BT, mask_BT, spec.params)
    g_BT = drift_gate(lp_BT, b.logp_old_BT, mask_BT, seg_BT, tau=spec.tau)
    return normalize_gate(g_BT, mask_BT, scope="sequence").cpu()
