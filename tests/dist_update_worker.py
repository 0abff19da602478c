"""Run by tests/test_distributed.py under torch.distributed.run: one update on a fixed rollout batch.

Every process builds the same batch (seeded sampling) and the same drifted student, takes its share of
rows, and runs ``run_update`` with the accelerate world; rank 0 saves the gradients the optimizer step
receives (summed over processes, divided by the global denominator, clipped) and the loss.

With a last argument ``sft``, SG-OPD's NLL term on endorsed teacher responses is added (weight 0.5),
and only rank 0 has any (rows 0-1 of the batch stand in for them): the other ranks have none, yet must
join every collective, and the result must equal one process with the same endorsed responses.

Gradients, not weights after the step: AdamW's first step is ``lr * g / (|g| + eps)``, which turns a
float32-rounding difference in a near-zero gradient element into a weight difference of order ``lr``.
"""

import faulthandler
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from opdkit.config import load_config
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import load_model, load_tokenizer
from opdkit.train.loop import build_update_spec
from opdkit.train.update import run_update

faulthandler.dump_traceback_later(240, exit=True)  # never hang CI


def main(student_dir, teacher_dir, out, loss, gate, reduction, sft=""):
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    tok = load_tokenizer(student_dir)
    student, teacher = load_model(student_dir, device="cpu"), load_model(teacher_dir, device="cpu")
    prompts = [tok(f"{i}+{2 * i}=")["input_ids"] for i in range(4)]
    batch = sample_rollouts(student, prompts, SamplingParams(max_new_tokens=9, samples_per_prompt=2),
                            eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                            generator=torch.Generator().manual_seed(0))
    batch = score_with_teacher(teacher, batch, topk=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = load_config(None, [f"loss.name={loss}", f"gate.name={gate}", "gate.block_size=3", "loss.topk=4",
                             f"loss.reduction={reduction}", "train.microbatch_size=3"], need_models=False)
    spec = build_update_spec(cfg, tok, None)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    names = {id(p): n for n, p in student.named_parameters()}
    grads = {}

    def capture(optimizer, args, kwargs):  # what the optimizer step is given
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone().contiguous()

    opt.register_step_pre_hook(capture)
    rows = list(range(batch.size))[acc.process_index::acc.num_processes]
    endorsed = batch.select([0, 1]) if sft == "sft" else None
    metrics = run_update(student, opt, sched, batch.select(rows), spec, world=acc,
                         sft_batch=endorsed if acc.is_main_process else None, sft_weight=0.5 if sft else 0.0)
    if acc.is_main_process:
        tokens = float(batch.response_mask_BT.sum()) + (float(endorsed.response_mask_BT.sum()) if sft else 0.0)
        save_file({**grads, "__loss__": torch.tensor([metrics["loss"]], dtype=torch.float64),
                   "__tokens__": torch.tensor([tokens])}, out)
        print("loss", metrics["loss"], "gate_min", metrics["gate_min"], "teacher_nll", metrics["teacher_nll"])


if __name__ == "__main__":
    main(*sys.argv[1:])
