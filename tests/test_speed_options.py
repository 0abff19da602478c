"""Options that change speed, not the method: ``model.attn_implementation`` (the trainer loads both models with
it; eager attention computes SDPA's log-probs and gradients to float32 rounding) and ``optim.adamw`` (torch's
fused AdamW kernel: the same updates to float32 rounding)."""

import pytest
import torch

from opdkit.config import load_config
from opdkit.runtime.models import load_model


def _cfg(tiny_models, tmp_path, *overrides):
    student, teacher, data = tiny_models
    return load_config(None, [f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
                              f"train.output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_trainer_loads_student_and_teacher_with_the_attention_asked_for(tiny_models, tmp_path, attn):
    from opdkit.train.setup import load_models

    student, teacher, _, _ = load_models(_cfg(tiny_models, tmp_path, f"model.attn_implementation={attn}"),
                                         torch.device("cpu"))
    assert student.config._attn_implementation == teacher.config._attn_implementation == attn


def test_eager_and_sdpa_give_the_same_logprobs_and_gradients(tiny_models):
    """Left-padded rows (the trainer's layout), float32: the sampled-token log-probs and the gradient of their
    sum agree between the two implementations to float32 rounding of O(1) values."""
    student, _, _ = tiny_models
    g = torch.Generator().manual_seed(0)
    ids_BT = torch.randint(3, 40, (3, 17), generator=g)
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[0, :5] = 0
    mask_BT[2, :2] = 0
    out = {}
    for attn in ("sdpa", "eager"):
        model = load_model(student, dtype="float32", device="cpu", attn_implementation=attn).train()
        assert model.config._attn_implementation == attn
        pos_BT = (mask_BT.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits.float()
        logp_BT = torch.log_softmax(logits[:, :-1], -1).gather(2, ids_BT[:, 1:, None]).squeeze(2)
        valid_BT = (mask_BT[:, :-1] * mask_BT[:, 1:]).bool()  # a real token after a real one (pad queries differ)
        (logp_BT * valid_BT).sum().backward()
        out[attn] = (logp_BT[valid_BT].detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (lp_s, gr_s), (lp_e, gr_e) = out["sdpa"], out["eager"]
    torch.testing.assert_close(lp_e, lp_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr_e, gr_s, rtol=1e-4, atol=1e-5)
    assert gr_s.abs().max() > 1e-3  # the comparison sees real gradients


@pytest.mark.parametrize("setting, fused", [("auto", False), ("fused", True), ("torch_default", False)])
def test_adamw_kernel_follows_the_setting(tiny_models, tmp_path, setting, fused):
    """auto is fused on CUDA only (on this CPU: torch's default, which the miniature's figures were measured with)."""
    from opdkit.train.setup import load_models, trainer_from_parts

    cfg = _cfg(tiny_models, tmp_path, f"optim.adamw={setting}")
    student, teacher, tok, vocab = load_models(cfg, torch.device("cpu"))
    t = trainer_from_parts(cfg, student, teacher, tok, vocab=vocab)
    assert bool(t.optimizer.defaults["fused"]) is fused


def test_fused_adamw_trains_to_the_same_weights(tiny_models, tmp_path):
    """Two updates on one rollout batch (the sampling happens before any update, so both runs see the same
    tokens): the final weights agree to float32 rounding of the parameters (|w| < 1, lr 1e-3)."""
    from opdkit.train.loop import train

    finals = {}
    for setting in ("torch_default", "fused"):
        out = tmp_path / setting
        cfg = _cfg(tiny_models, out, f"optim.adamw={setting}", "data.max_prompt_tokens=64",
                   "data.prompt_template={problem}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                   "rollout.max_new_tokens=6", "rollout.reward=none", "train.train_steps=1", "train.rollout_passes=2",
                   "train.progress=false", "train.save_every_steps=0", "optim.lr=1e-3", "train.device=cpu")
        finals[setting] = load_model(train(cfg, print_fn=lambda *a: None))
    a, b = (finals[k].state_dict() for k in ("torch_default", "fused"))
    start = load_model(tiny_models[0]).state_dict()
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4  # the updates moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
