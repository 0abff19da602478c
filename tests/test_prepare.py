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
