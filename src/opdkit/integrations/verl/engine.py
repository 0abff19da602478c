"""verl FSDP engine with opdkit's hook, registered under vendor ``opdkit`` (``VERL_ENGINE_VENDOR=opdkit``).

Per mini-batch (one optimizer step) it: flags the batch so the losses know the exact denominator is
available, keeps the sampled-token log-probs (the drift gate needs them even for top-K-only losses),
installs the LSM logits processor, runs verl's own ``forward_backward_batch``, then all-reduces the
accumulated denominator over the data-parallel group and rescales the gradients
(:mod:`opdkit.integrations.verl.denominator`) before verl's ``optimizer_step`` clips and steps; the
mini-batch's exact ``opdkit/grad_scale``, ``opdkit/tokens`` and ``opdkit/gate_mean_minibatch`` join verl's metrics.
"""

from __future__ import annotations

import torch
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from opdkit.integrations.verl.denominator import ACCUMULATOR, finish_mini_batch
from opdkit.integrations.verl.logits import with_opdkit_logits
from opdkit.integrations.verl.losses import HOOK_KEY
from opdkit.integrations.verl.telemetry import hook_metrics

VENDOR = "opdkit"


@EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cuda", vendor=VENDOR)
class OpdkitFSDPEngine(FSDPEngineWithLMHead):
    """``FSDPEngineWithLMHead`` + the exact-denominator rescale and the LSM logits processor."""

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        if forward_only:
            return super().forward_backward_batch(data, loss_function, forward_only=True)
        tu.assign_non_tensor(data, **{HOOK_KEY: True, "distillation_only": False})
        ACCUMULATOR.reset()
        out = super().forward_backward_batch(data, with_opdkit_logits(loss_function), forward_only=False)
        group = self.get_data_parallel_group()
        stats = finish_mini_batch(self.module.parameters(), tu.get_non_tensor_data(data, "batch_num_tokens", None),
                                  all_reduce=lambda t: torch.distributed.all_reduce(t, group=group),
                                  device=get_device_id())  # where verl all-reduces batch_num_tokens
        if isinstance(out, dict) and isinstance(out.get("metrics"), dict):
            out["metrics"].update(hook_metrics(stats))
        return out
