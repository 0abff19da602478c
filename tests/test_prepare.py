"""The miniature's checkpoint recipe (opdkit.tasks.prepare): argument checks and a reproducible SFT."""

import pytest
import torch

from opdkit.runtime.models import TinyQwen3Spec
from opdkit.tasks import prepare as P
from opdkit.tasks.chain import chain_tokenizer


def test_prepare_rejects_bad_roles_and_stop(tmp_path):
    with pytest.raises(ValueError, match="roles"):
        P.prepare_miniature(tmp_path, roles=("critic",))
    with pytest.raises(ValueError, match="student_stop_after"):
        P.prepare_miniature(tmp_path, roles=("student",), student_stop_after=5000)
    assert not (tmp_path / "student").exists()


def test_sft_is_reproducible_and_stops_early():
    tok = chain_tokenizer()
    spec = TinyQwen3Spec(vocab_size=P.VOCAB, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, intermediate_size=64, max_position_embeddings=256)

    def run(stop):
        m = P._build(spec, tok, 3)
        log = P.sft(m, tok, steps=6, lr=1e-3, seed=0, batch_size=4, warmup=2, k_range=(2, 3), progress=False,
                    stop_after=stop)
        return m, log

    a, log_a = run(None)
    b, _ = run(None)
    c, _ = run(3)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seeds, same data order: same weights
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)  # stopped after 3 of 6 steps
    assert log_a["losses"][0][0] == 0 and log_a["final_loss_ema"] > 0


def test_slipped_solution_trains_only_on_recovery():
    import random

    from opdkit.tasks.chain import answer_of, random_problem, solve

    rng = random.Random(0)
    problem = random_problem(rng, 6)
    clean = P.slipped_solution(problem, rng)
    assert "".join(t for t, _ in clean) == solve(problem) and all(tr for _, tr in clean)
    slips = extras = 0
    for _ in range(200):
        segs = P.slipped_solution(problem, rng, 0.5, 0.5)
        text = "".join(t for t, _ in segs)
        lines = text.split("\n")
        untrained = [t for t, tr in segs if not tr]
        extras += len(lines) == 8
        slips += any(len(t) == 2 for t in untrained)
        # the injected text (a wrong result, a made-up line) is never a training target ...
        assert all(len(t) == 2 or (len(t) == 10 and t.endswith("\n")) for t in untrained)
        # ... and every step after it goes on from what is written: state copied, op applied correctly
        for prev, line in zip(lines[:-2], lines[1:-1]):
            assert line[:2] == prev[-2:]
        assert lines[-1] == "answer: " + lines[-3 if len(lines) == 8 else -2][-2:]
        if not untrained:
            assert lines[-1] == "answer: " + answer_of(problem)
    assert 60 < slips < 140 and 60 < extras < 140


def test_encode_batch_masks_injected_text_and_pads():
    tok = chain_tokenizer()
    batch = [("12 a+3", [("12 a+3=", True), ("99", False), ("\n", True), ("answer: 99", True)]),
             ("12 a+3 b+1", [("12 a+3=15\n", True), ("15 b+1=16\n", True), ("answer: 16", True)])]
    ids, labels = P.encode_batch(tok, batch)
    assert ids.shape == labels.shape and ids.shape[0] == 2
    row = labels[0].tolist()
    p = len("12 a+3\n")
    assert row[:p] == [-100] * p  # prompt
    assert row[p + 7:p + 9] == [-100, -100]  # the slipped result
    assert row[p + 9] == tok.convert_tokens_to_ids("\n") and tok.eos_token_id in row
    assert row[-1] == -100 and ids[0, -1].item() == tok.pad_token_id  # right padding is not trained
    assert (labels[1] != -100).sum().item() == len("12 a+3=15\n15 b+1=16\nanswer: 16") + 1


def test_clean_segments_encode_exactly_as_the_plain_solution():
    # slips (0, 0) (train_batches' default; the shipped student's recipe): the segmented encoding is the
    # plain one (solution tokens + eos, no padding)
    tok = chain_tokenizer()
    batch = next(P.train_batches(0, 4))
    ids, labels = P.encode_batch(tok, batch)
    from opdkit.tasks.chain import format_prompt, solve

    for (problem, _segs), row, lab in zip(batch, ids.tolist(), labels.tolist()):
        p = tok(format_prompt(problem), add_special_tokens=False).input_ids
        r = tok(solve(problem), add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert row == p + r and lab == [-100] * len(p) + r


def _digest(batches, n=3):
    import hashlib
    import json

    h = hashlib.sha256()
    for _ in range(n):
        h.update(json.dumps(next(batches)).encode())
    return h.hexdigest()


def test_recipe_data_streams_are_pinned():
    # every stream is pinned so the recipe cannot change silently: the first format (countdown=False), the
    # countdown format of the shipped recipe, clean and with the teacher's slips. Digests taken when the
    # multipliers became bijective (MUL_DIGITS, #13), which changed every stream.
    assert _digest(P.train_batches(5, 32, (4, 24), countdown=False)) == \
        "ece4b9fbf114f491df45f471b826723f9aaab52e5981e96d6eee500931ee1cc0"
    assert _digest(P.train_batches(5, 32, (4, 24))) == \
        "07c4ba5b08e7b7493c5f5a9784f24ca085a0932b3e95048638edf93cc6805e97"
    assert _digest(P.train_batches(5, 32, (4, 24), (0.25, 0.25))) == \
        "caf07fda109cf4e389b9ace7556a95d539cc3395add2a2c3eb099948940af297"
    # the shipped recipe trains on the countdown format only; only the teacher sees off-track traces
    assert all(ph.countdown for ph in P.TEACHER_PHASES + P.STUDENT_PHASES)
    assert all(ph.slips == (0.0, 0.0) for ph in P.STUDENT_PHASES)
    assert P.TEACHER_PHASES[-1].slips == (0.25, 0.25)
