"""The opdkit engine (``VERL_ENGINE_VENDOR=opdkit``) around verl 0.9.1's real ``forward_backward_batch``.

verl's own loop runs unchanged (batch_num_tokens all-reduce, ``prepare_micro_batches``, the gradient-sync
context, ``postprocess_batch_func``) on a one-process gloo group; only ``forward_step`` is replaced by the tiny
logits "model" of :mod:`verl_batches`, calling the loss function the way verl's ``forward_step`` /
``prepare_model_outputs`` do (the top-K logits-processor call first, then the final loss). The gradient must
equal opdkit's ``reduce_loss`` reference; FSDP / CUDA / more than one rank are not exercised here.
"""

from __future__ import annotations

import functools
import types

import pytest

# not importorskip("verl"): with tests/ on sys.path this folder itself imports as a namespace package "verl"
pytest.importorskip("verl.trainer.distillation.losses", reason="verl lane only (.ci/run stage verl)")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_verl_losses import ATOL, RTOL, loss_config, reference  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import DistillationConfig, FSDPActorConfig  # noqa: E402
from verl_batches import make_batch, micro_batch, model_output, packed_logits  # noqa: E402

import opdkit.integrations.verl.engine as opdkit_engine  # noqa: E402
from opdkit.integrations.verl.engine import OpdkitFSDPEngine  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def gloo_world(tmp_path_factory):
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Engine(OpdkitFSDPEngine):
    """The opdkit engine with a logits tensor as its model (no __init__: no FSDP, no CUDA)."""

    def __init__(self, b):  # noqa: D107 (deliberately not FSDPEngine.__init__)
        self.b = b
        self.module = torch.nn.Module()
        self.module.Z = torch.nn.Parameter(b.Z.detach().clone())
        b.Z = self.module.Z
        self.ulysses_sequence_parallel_size = 1
        self.ulysses_device_mesh = None
        self.engine_config = types.SimpleNamespace(use_no_sync_for_gradient_accumulation=True)

    def forward_step(self, micro_batch, loss_function, forward_only):
        rows = micro_batch["row_id"].tolist()
        out = model_output(self.b, rows, micro_batch)
        if tu.get_non_tensor_data(micro_batch, "distillation_use_topk", False):
            for k, v in loss_function(student_logits=packed_logits(self.b, rows)[None], data=micro_batch).items():
                out[k] = torch.nested.nested_tensor_from_jagged(v.squeeze(0), micro_batch["input_ids"].offsets())
        loss, metrics = loss_function(model_output=out, data=micro_batch, dp_group=self.get_data_parallel_group())
        return loss, {"loss": loss.detach().item(), "metrics": metrics}


@pytest.mark.parametrize("mode,gate,scope,micro", [
    ("opd", "block", "batch", 2), ("opd", "newline", "sequence", 4), ("lsm", "block", "batch", 2),
    ("opd", "none", "batch", 1),
])
def test_engine_hook_gives_opdkit_gradient(monkeypatch, mode, gate, scope, micro):
    monkeypatch.setattr(opdkit_engine, "get_device_id", lambda: "cpu")
    monkeypatch.setattr("verl.workers.engine.fsdp.transformer_impl.get_device_id", lambda: "cpu")
    b = make_batch(topk=mode == "lsm", seed=6)
    ref_loss, ref_grad = reference(b, mode, gate, scope, special=True)
    eng = Engine(b)
    lcfg = loss_config(mode, gate, scope, True)
    actor = FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=micro, rollout_n=1)
    loss_fn = functools.partial(distillation_ppo_loss, config=actor,
                                distillation_config=DistillationConfig(enabled=False, distillation_loss=lcfg))
    td = micro_batch(b, list(range(8)), nested=True, batch_num_tokens=0, dp_size=1, hook=False)
    td["row_id"] = torch.arange(8)
    tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro, global_batch_size=8,
                         distillation_use_topk=lcfg.loss_settings.use_topk, distillation_only=True)
    out = eng.forward_backward_batch(td, loss_fn, forward_only=False)
    torch.testing.assert_close(eng.module.Z.grad, ref_grad, rtol=RTOL, atol=ATOL)
    assert ref_grad.abs().max() > 1e-3
    scale = out["metrics"]["opdkit/grad_scale"][0].aggregate()
    verl_loss = sum(out["loss"])  # verl's per-micro-batch values (its divisor); the hook's scale makes them opdkit's
    torch.testing.assert_close(torch.tensor(verl_loss * scale, dtype=torch.float32), ref_loss, rtol=RTOL, atol=ATOL)
    assert out["metrics"]["opdkit/tokens"][0].aggregate() < float(b.mask_BR.sum())  # special tokens were masked

