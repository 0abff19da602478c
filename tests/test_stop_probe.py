"""benchmarks/stop_probe.py: the teacher's p(stop) around the last step, on a tiny random model."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import torch

from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
from opdkit.tasks.chain import LETTERS, apply_op, chain_tokenizer, make_benchmark, solve

_SPEC = importlib.util.spec_from_file_location(
    "stop_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "stop_probe.py")
probe = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(probe)


def test_probe_text_appends_made_up_steps_that_continue_the_state():
    problem = make_benchmark(5, 1, seed=1)[0]["problem"]
    text, k = probe.probe_text(problem, random.Random(0), extra=2)
    assert k == 5
    lines = text.split("\n")
    assert lines[0] == problem and "\n".join(lines[1:6]) + "\nanswer: " + lines[5][-2:] == solve(problem)
    # countdown format: no letter follows the last step's ``a``, so a made-up step reuses one of the prompt's
    for prev, line in ((lines[5], lines[6]), (lines[6], lines[7])):
        x, op, d = int(prev[-2:]), line[4], int(line[5])
        assert line[:2] == prev[-2:] and line[3] in LETTERS[:k] and int(line[-2:]) == apply_op(x, op, d)
    assert text.endswith("\n") and lines[-1] == ""


def test_stop_probs_match_one_forward_per_prefix():
    tok = chain_tokenizer()
    model = tiny_qwen3(TinyQwen3Spec(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                     head_dim=16, intermediate_size=64), seed=0,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id).eval()
    problems = [r["problem"] for r in make_benchmark(4, 3, seed=2)]
    got = probe.stop_probs(model, tok, problems, seed=5)
    assert set(got) == set(probe.OFFSETS) and all(len(v) == 3 for v in got.values())
    rng = random.Random("opdkit-stop-probe-5")
    a_id = tok.convert_tokens_to_ids("a")
    for i, problem in enumerate(problems):
        text, k = probe.probe_text(problem, rng, extra=max(probe.OFFSETS))
        lines = text.split("\n")
        for o in probe.OFFSETS:
            prefix = "\n".join(lines[:1 + k + o]) + "\n"  # prompt line + (k + o) step lines
            ids = tok(prefix, add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                want = model(input_ids=ids).logits[0, -1].double().softmax(-1)[a_id].item()
            # same float32 forward on a shorter input: agreement to float32 rounding of a probability
            assert abs(got[o][i] - want) <= 1e-5, (o, got[o][i], want)
