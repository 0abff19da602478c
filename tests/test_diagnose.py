"""Diagnostics (docs/methods.md §6, arXiv 2605.10889): direction math, exact toy, targeted rollouts, CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from opdkit.diagnose import directions as D
from opdkit.losses.divergences import forward_kl, generalized_jsd, reverse_kl
from opdkit.losses.lsm import topk_support_matching
from opdkit.losses.opd import sampled_token_opd

torch.set_num_threads(1)
F64 = torch.float64
C = 7


def _node(seed: int = 0) -> tuple[torch.Tensor, D.NodeTensors]:
    g = torch.Generator().manual_seed(seed)
    z_C = torch.randn(C, generator=g, dtype=F64) * 2
    zq_C = torch.randn(C, generator=g, dtype=F64) * 2
    q_C = torch.softmax(zq_C, 0)
    top = torch.zeros(C, dtype=torch.bool)
    top[zq_C.topk(3).indices] = True
    n = D.NodeTensors(p_C=torch.softmax(z_C, 0), q_C=q_C, psucc_C=torch.rand(C, generator=g, dtype=F64),
                      teacher_topk_C=top, sampled=2, future_C=torch.randn(C, generator=g, dtype=F64),
                      reward=1.0, future_norm_C=torch.randn(C, generator=g, dtype=F64) * 0.1)
    return z_C, n


def _ascent(loss_fn, z_C: torch.Tensor) -> torch.Tensor:
    """−∂loss/∂z in float64."""
    z = z_C.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(z), z)
    return -g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_direction_sums_to_zero(seed):
    _, n = _node(seed)
    assert abs(float(D.ideal_gradient(n.p_C, n.psucc_C).sum())) < 1e-12
    for name in D.method_names((0.0, 0.25, 0.9, 1.0)):
        d = D.get_method(name)(n)
        assert d.shape == (C,) and d.dtype == F64
        assert abs(float(d.sum())) < 1e-12, name


@pytest.mark.parametrize("seed", [0, 1])
def test_directions_equal_autograd_of_their_losses(seed):
    z, n = _node(seed)
    lq = torch.log(n.q_C)
    b11 = lambda x: x[None, None]  # noqa: E731  [C] -> [1,1,C]
    checks = {
        "reverse_kl": _ascent(lambda z: reverse_kl(b11(z), b11(lq)).sum(), z),
        "forward_kl": _ascent(lambda z: forward_kl(b11(z), b11(lq)).sum(), z),
        "jsd_0.5": _ascent(lambda z: generalized_jsd(b11(z), b11(lq), beta=0.5).sum(), z),
        # MiniLLM: sequence-level reverse KL at the node with the future KL fixed: Σ p (log p − log q − F)
        "minillm": _ascent(lambda z: (torch.softmax(z, 0) * (torch.log_softmax(z, 0) - lq - n.future_C)).sum(), z),
        # Dr.GRPO in expectation: surrogate −Σ_y sg(p_y) (Psucc_y − b) log p_y (any baseline b)
        "drgrpo": _ascent(lambda z: -(n.p_C * (n.psucc_C - 0.3) * torch.log_softmax(z, 0)).sum(), z),
        "drgrpo_sampled": _ascent(lambda z: -(1.0 - float((n.p_C * n.psucc_C).sum()))
                                  * torch.log_softmax(z, 0)[n.sampled], z),
    }
    for beta in (0.0, 0.1, 0.9, 1.0):
        checks[f"jsd_{beta:g}"] = _ascent(lambda z, b=beta: generalized_jsd(b11(z), b11(lq), beta=b).sum(), z)

    def opd(z, y):  # sampled-token OPD (§2.1) at π_θ = π_old for sampled token y
        lp = torch.log_softmax(z, 0)[y]
        return sampled_token_opd(lp.view(1, 1), lp.detach().view(1, 1), lq[y].view(1, 1), torch.ones(1, 1)).sum()

    checks["opd_sampled"] = _ascent(lambda z: opd(z, n.sampled), z)
    # OPD in expectation over y ~ p equals the reverse-KL direction
    opd_expected = _ascent(lambda z: sum(n.p_C[y] * opd(z, y) for y in range(C)), z)
    assert torch.allclose(opd_expected, D.reverse_kl_direction(n.p_C, n.q_C), atol=1e-12)
    # LSM: loss on the teacher top-K gathered logits (§2.2); the gradient is zero outside S
    S = n.teacher_topk_C.nonzero().squeeze(1)
    checks["lsm"] = _ascent(lambda z: topk_support_matching(b11(z[S]), b11(lq[S])).sum(), z)
    for name, ref in checks.items():
        got = D.get_method(name)(n)
        assert torch.allclose(got, ref, atol=1e-12, rtol=1e-9), (name, got, ref)
    # g* is the gradient of the success probability Σ_j p_j Psucc_j
    ref = -_ascent(lambda z: (torch.softmax(z, 0) * n.psucc_C).sum(), z)
    assert torch.allclose(D.ideal_gradient(n.p_C, n.psucc_C), ref, atol=1e-12)
    # §6's form for JSD: f = (1−β) log(m/p)
    m = 0.3 * n.q_C + 0.7 * n.p_C
    assert torch.allclose(D.jsd_direction(n.p_C, n.q_C, 0.3), D.centered(n.p_C, 0.7 * torch.log(m / n.p_C)))
    assert torch.allclose(D.forward_kl_direction(n.p_C, n.q_C), D.centered(n.p_C, n.q_C / n.p_C))


# ------------------------------------------------------------------ exact toy with closed-form Psucc
V, H = 3, 3  # vocabulary and horizon of a tabular autoregressive policy


def _prefixes():
    return [tuple(p) for h in range(H) for p in itertools.product(range(V), repeat=h)]


def _reward(seq) -> float:
    return float((sum(seq) + seq[0] * seq[-1]) % 3 == 1)  # any closed-form verifier


def _seq_logp(logits, seq, pre_index):
    return sum(torch.log_softmax(logits[pre_index[seq[:t]]], 0)[seq[t]] for t in range(H))


def test_toy_drgrpo_and_minillm_equal_exact_gradients():
    """Exact Psucc by enumeration: g* = Dr.GRPO = ∂P(success)/∂z_u / P(reach u); MiniLLM = −∂KL_seq/∂z_u / P(u)."""
    g = torch.Generator().manual_seed(0)
    pres = _prefixes()
    idx = {p: i for i, p in enumerate(pres)}
    logits = (torch.randn(len(pres), V, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    tlogits = torch.randn(len(pres), V, generator=g, dtype=F64) * 1.5
    seqs = list(itertools.product(range(V), repeat=H))
    lp = {s: _seq_logp(logits, s, idx) for s in seqs}
    lq = {s: _seq_logp(tlogits, s, idx) for s in seqs}
    J = sum(lp[s].exp() * _reward(s) for s in seqs)
    (dJ,) = torch.autograd.grad(J, logits, retain_graph=True)
    surrogate = sum(lp[s].exp().detach() * (_reward(s) - 0.5) * lp[s] for s in seqs)  # Dr.GRPO, baseline 0.5
    (dG,) = torch.autograd.grad(surrogate, logits, retain_graph=True)
    kl = sum(lp[s].exp() * (lp[s] - lq[s]) for s in seqs)
    (dK,) = torch.autograd.grad(kl, logits)
    with torch.no_grad():
        P = {s: float(lp[s].exp()) for s in seqs}
        for u in pres:
            t = len(u)
            ext = [s for s in seqs if s[:t] == u]
            reach = sum(P[s] for s in ext)
            p_C, q_C = torch.softmax(logits[idx[u]], 0), torch.softmax(tlogits[idx[u]], 0)
            psucc = torch.tensor([sum(P[s] * _reward(s) for s in ext if s[t] == j) / sum(P[s] for s in ext if s[t] == j)
                                  for j in range(V)], dtype=F64)
            fut = torch.tensor([sum(P[s] * float(sum(
                torch.log_softmax(tlogits[idx[s[:k]]], 0)[s[k]] - torch.log_softmax(logits[idx[s[:k]]], 0)[s[k]]
                for k in range(t + 1, H))) for s in ext if s[t] == j) / sum(P[s] for s in ext if s[t] == j)
                for j in range(V)], dtype=F64)
            gstar = D.ideal_gradient(p_C, psucc)
            assert torch.allclose(gstar, dJ[idx[u]] / reach, atol=1e-10)
            assert torch.allclose(D.drgrpo_direction(p_C, psucc), gstar, atol=1e-12)
            assert torch.allclose(dG[idx[u]] / reach, gstar, atol=1e-10)
            assert torch.allclose(D.minillm_direction(p_C, q_C, fut), -dK[idx[u]] / reach, atol=1e-10)


def test_cosine_zero_and_gates():
    _, n = _node(3)
    flat = torch.full((C,), 0.5, dtype=F64)
    assert torch.equal(D.ideal_gradient(n.p_C, flat), torch.zeros(C, dtype=F64))  # exact zero, no rounding noise
    assert math.isnan(D.cosine(torch.zeros(C, dtype=F64), n.p_C))
    g, d = D.ideal_gradient(n.p_C, n.psucc_C), D.reverse_kl_direction(n.p_C, n.q_C)
    assert D.cosine(g, 3.0 * d) == pytest.approx(D.cosine(g, d))  # a gate does not change the node cosine
    assert D.cosine(g, g) == pytest.approx(1.0)
    _, n2 = _node(4)
    g2, d2 = D.ideal_gradient(n2.p_C, n2.psucc_C), D.reverse_kl_direction(n2.p_C, n2.q_C)
    base = D.concat_cosine([g, g2], [d, d2])
    assert D.concat_cosine([g, g2], [d, d2], [2.0, 2.0]) == pytest.approx(base)  # uniform scale: invariant
    assert D.concat_cosine([g, g2], [d, d2], [1.0, 0.1]) != pytest.approx(base)  # gates re-weight nodes


def test_node_positions_and_candidates():
    from opdkit.diagnose.nodes import candidate_ids, node_positions

    assert node_positions(10) == [0, 1, 3, 7]
    assert node_positions(8) == [0, 1, 3, 7]
    assert node_positions(100, max_nodes=3) == [0, 1, 3]
    s = torch.tensor([0.0, 5.0, 4.0, 3.0, -1.0])
    t = torch.tensor([9.0, 0.0, 8.0, 0.0, 7.0])
    assert candidate_ids(3, s, t, 2) == [3, 1, 2, 0]
    assert candidate_ids(4, s, t, 3) == [4, 1, 2, 3, 0]


# ------------------------------------------------------------------ targeted rollouts and the CLI on tiny models
def _digit_grader(texts, answers):
    """A toy verifier that candidates can change: the response starts with a digit smaller than 5."""
    return [float(bool(t) and t[0] in "01234") for t in texts]


@pytest.fixture(scope="module")
def chain_models(tmp_path_factory):
    from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
    from opdkit.tasks.chain import chain_tokenizer, make_benchmark, write_jsonl

    root = tmp_path_factory.mktemp("diag")
    tok = chain_tokenizer()
    spec = TinyQwen3Spec(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=16, intermediate_size=64)
    for name, seed, s in (("student", 1, spec), ("teacher", 2, replace(spec, hidden_size=48)), ("drifted", 3, spec)):
        m = tiny_qwen3(s, seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = make_benchmark(3, 6)
    rows[0]["id"] = "q<0>&"  # must be escaped in the HTML / Markdown
    write_jsonl(rows, root / "data.jsonl")
    return root


def test_probe_one_sampler_call_per_node_and_deterministic(chain_models, monkeypatch):
    import opdkit.diagnose.nodes as N
    from opdkit.runtime.models import load_model, load_tokenizer

    tok = load_tokenizer(chain_models / "student")
    student, teacher = load_model(chain_models / "student", device="cpu"), load_model(chain_models / "teacher",
                                                                                        device="cpu")
    calls = []
    real = N.sample_rollouts
    monkeypatch.setattr(N, "sample_rollouts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    prompt = tok("12 a+3\n").input_ids
    resp = tok("5 6 7 8 9 1 2").input_ids
    params = N.ProbeParams(m=4, max_new_tokens=20)
    kw = dict(grade=_digit_grader, decode=lambda ids: tok.decode(ids, skip_special_tokens=True), params=params,
              eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, vocab=len(tok), seed=7, rollout=1)
    a = N.probe_rollout(student, {"t": teacher}, prompt, resp, "0", **kw)
    assert [p.pos for p in a] == N.node_positions(len(resp)) == [0, 1, 3, 7]
    assert len(calls) == len(a)  # one batched sampler call per node
    for p in a:
        assert p.union_ids_U[p.cand_idx["t"][0]] == p.sampled_id  # the sampled token is always a candidate
        assert p.rewards_UM.shape == (len(p.union_ids_U), 4)
    b = N.probe_rollout(student, {"t": teacher}, prompt, resp, "0", **kw)
    for x, y in zip(a, b):
        assert torch.equal(x.psucc_U, y.psucc_U) and torch.equal(x.future_sum["t"], y.future_sum["t"])
    assert any(float(p.psucc_U.max() - p.psucc_U.min()) > 0 for p in a[:1])  # depth 1 decides the grade
    small = N.probe_rollout(student, {"t": teacher}, prompt, resp, "0", **{**kw, "params": replace(params,
                                                                                                   budget_tokens=200)})
    assert len(small) < len(a)  # the completion-token budget stops the walk


def _settings(root, out, **kw):
    from opdkit.diagnose.nodes import ProbeParams
    from opdkit.diagnose.runner import DiagnoseSettings

    base = dict(student=str(root / "student"), teachers=[str(root / "teacher")], data=str(root / "data.jsonl"),
                n_rollouts=4, samples_per_question=2, grader=_digit_grader, probe=ProbeParams(m=4, max_new_tokens=16),
                out=str(out), progress=False)
    return DiagnoseSettings(**{**base, **kw})


def test_diagnose_api_deterministic_with_gates(chain_models, tmp_path):
    from opdkit.diagnose.runner import diagnose

    s1 = diagnose(_settings(chain_models, tmp_path / "a", gate_model=str(chain_models / "drifted")))
    diagnose(_settings(chain_models, tmp_path / "b", gate_model=str(chain_models / "drifted")))
    na, nb = ((tmp_path / d / "nodes.jsonl").read_text() for d in "ab")
    assert na == nb and na  # deterministic under a seed
    diagnose(_settings(chain_models, tmp_path / "c", seed=1))
    assert (tmp_path / "c" / "nodes.jsonl").read_text() != na
    diagnose(_settings(chain_models, tmp_path / "w", gate_model=str(chain_models / "drifted"), workers=2))
    assert (tmp_path / "w" / "nodes.jsonl").read_text() == na  # two spawned workers: the same nodes
    recs = [json.loads(x) for x in na.splitlines()]
    assert s1["nodes"] == len(recs) and s1["skipped_gstar_zero"] == sum(r["skipped"] for r in recs)
    scored = [r for r in recs if not r["skipped"]]
    assert scored, "the toy verifier must give some nodes a non-zero g*"
    for r in recs:
        assert r["candidates"][0] == r["sampled_id"] and abs(sum(r["p"]) - 1) < 1e-4 and r["gate"] is not None
        assert set(r["alignment"]) == set(s1["methods"])
    assert all(r["alignment"]["drgrpo"] == pytest.approx(1.0) for r in scored)
    agg = json.loads((tmp_path / "a" / "aggregates.json").read_text())
    teacher = s1["teachers"][0]
    assert agg[teacher]["by_split"]["all"]["rollouts"] == 4
    roll = [json.loads(x) for x in (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()]
    assert all(len(r["gates"]) == len(r["tokens"]) for r in roll)
    assert "Gated rollout direction" in (tmp_path / "a" / "report.md").read_text()


def test_cli_end_to_end_tiny(chain_models, tmp_path):
    from opdkit.cli.main import main
    from opdkit.config import Config, save_config

    run = tmp_path / "run"
    cfg = Config()
    cfg.gate.name, cfg.gate.block_size = "block", 4
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text("")
    import shutil

    shutil.copytree(chain_models / "drifted", run / "final")
    out = tmp_path / "out"
    rc = main(["diagnose", "--student", str(chain_models / "student"),
               "--teacher", f"{chain_models / 'teacher'},{chain_models / 'student'}", "--data",
               str(chain_models / "data.jsonl"), "--grader", "chain", "--n-rollouts", "3", "--m", "2",
               "--max-new-tokens", "12", "--jsd-beta", "0.1", "--metrics", str(run / "metrics.jsonl"),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    for f in ("nodes.jsonl", "rollouts.jsonl", "aggregates.json", "summary.json", "report.md", "alignment_hist.png",
              "alignment_hist_2.png", "alignment_depth.png", "rollouts.html"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teachers"] == ["teacher", "student"] and "jsd_0.1" in summary["methods"]
    assert summary["gate"]["block_size"] == 4 and summary["completions_per_s"] > 0
    page = (out / "rollouts.html").read_text()
    assert "q&lt;0&gt;&amp;" in page and "q<0>" not in page and "<|im_end|>" not in page
    md = (out / "report.md").read_text()
    assert "| method | correct | incorrect |" in md


@pytest.mark.slow
def test_cli_miniature_end_to_end(tmp_path):
    from opdkit.cli.main import main
    from opdkit.diagnose.runner import MINIATURE

    if not (MINIATURE / "student" / "config.json").is_file():
        pytest.skip("shipped miniature checkpoints not built")
    out = tmp_path / "mini"
    assert main(["diagnose", "--n-rollouts", "6", "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rollouts"] == 6 and s["nodes"] > 0
    assert (out / "rollouts.html").stat().st_size > 0 and (out / "alignment_hist.png").is_file()
