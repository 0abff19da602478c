"""Diagnostics (docs/methods.md §6; arXiv 2605.10889): ideal per-token gradients from targeted rollouts and the
alignment of each distillation method's logit direction with them (``opdkit diagnose``)."""

from opdkit.diagnose.directions import (
    METHODS,
    NodeTensors,
    centered,
    concat_cosine,
    cosine,
    drgrpo_direction,
    forward_kl_direction,
    get_method,
    ideal_gradient,
    jsd_direction,
    lsm_direction,
    method_names,
    minillm_direction,
    opd_sampled_direction,
    reverse_kl_direction,
)
from opdkit.diagnose.nodes import NodeProbe, ProbeParams, node_positions, probe_rollout

__all__ = [
    "METHODS", "NodeProbe", "NodeTensors", "ProbeParams", "centered", "concat_cosine", "cosine",
    "drgrpo_direction", "forward_kl_direction", "get_method", "ideal_gradient", "jsd_direction", "lsm_direction",
    "method_names", "minillm_direction", "node_positions", "opd_sampled_direction", "probe_rollout",
    "reverse_kl_direction",
]
