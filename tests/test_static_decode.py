"""The static-shape decode step (opdkit.rollout.graph_step): same samples as the lean step, eagerly and
compiled, its check against the model's own forward with the fallback, and the eager fallback when
compiling fails.

Tolerance: the static step attends over all P + N columns (the closed ones with weight exactly 0) where the
lean step attends over the prefix, so the float32 sums differ in order only: log-probs agree to a few
float32 roundings of values of size ~5 (observed 1e-6; 1e-5 allowed), and the tokens are identical.
"""

import warnings

import pytest
import torch

from opdkit.rollout import decode_steps, graph_step
from opdkit.rollout.graph_step import StaticStep
from opdkit.rollout.sampler import STATIC_PROMPT_MULTIPLE, SamplingParams, sample_rollouts

# the sampler tests' tiny model, prompts (left padding: rows of different lengths) and comparison
from test_sampler_gpu_path import PAD, PROMPTS, _model, _same


def _sample(model, static, n=24, **kw):
    p = SamplingParams(max_new_tokens=n, samples_per_prompt=2, static_decode=static, **kw)
    return sample_rollouts(model, PROMPTS, p, eos_token_ids=[2, 7, 11], pad_token_id=PAD,
                           generator=torch.Generator().manual_seed(3))


def _force_mode(monkeypatch, mode):
    """Make the sampler ask for ``mode``; returns the list of the steps it decodes with (their mode, or
    the class name of a non-static step)."""
    monkeypatch.setattr("opdkit.rollout.sampler.static_mode", lambda device: mode)
    used = []
    real = graph_step.pick_decode_step

    def spy(*a, **kw):
        step = real(*a, **kw)
        used.append(step.mode if isinstance(step, StaticStep) else type(step).__name__)
        return step

    monkeypatch.setattr(graph_step, "pick_decode_step", spy)
    return used


def test_static_step_eager_equals_lean_step(monkeypatch):
    model = _model()
    lean = _sample(model, False)
    used = _force_mode(monkeypatch, "eager")
    static = _sample(model, True)
    assert used == ["eager"]
    assert len(set(lean.response_lengths_B.tolist())) > 1 and "eos" in lean.stop_reasons  # rows end apart
    _same(lean, static)
    # the static step decodes prompts left-padded to a multiple of STATIC_PROMPT_MULTIPLE tokens; the
    # returned batch holds the prompts as the lean step's does (the extra all-padding columns dropped)
    assert max(map(len, PROMPTS)) % STATIC_PROMPT_MULTIPLE != 0
    assert torch.equal(lean.prompt_ids_BP, static.prompt_ids_BP)
    assert torch.equal(lean.prompt_mask_BP, static.prompt_mask_BP)


def test_static_step_is_checked_and_falls_back_to_the_lean_step(monkeypatch):
    """A wrong static step (here: the norm weights ignored) fails the check: warn, sample with the lean step."""
    model = _model()
    lean = _sample(model, False)
    real = graph_step._step_fn

    def wrong(tok_B, pos_1, t_1, embed_VH, layers, *rest):
        return real(tok_B, pos_1, t_1, embed_VH, [(torch.ones_like(l[0]), *l[1:]) for l in layers], *rest) * 1.5

    monkeypatch.setattr(graph_step, "_step_fn", wrong)
    used = _force_mode(monkeypatch, "eager")
    with pytest.warns(UserWarning, match="StaticStep decode step disagrees"):
        out = _sample(model, True)
    assert used == ["LeanStep"]
    _same(lean, out)


def test_failed_compile_warns_and_decodes_eagerly(monkeypatch):
    model = _model()
    lean = _sample(model, False)

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(graph_step, "_COMPILED", {})
    used = _force_mode(monkeypatch, "compile")
    with pytest.warns(UserWarning, match="compile decode step failed"):
        out = _sample(model, True)
    assert used == ["compile"]  # chosen; it fell back to eager at its first call
    _same(lean, out)


def test_static_step_drops_finished_rows_in_halving_buckets(monkeypatch):
    """Eagerly (as with a CUDA graph) the static step leaves finished rows behind in halving buckets: the
    batch sizes go 8 -> 4 -> 2 -> 1 at most, and the samples equal the lean step's (which drops every
    finished row) and those of a static run that keeps every row."""
    model = _model()
    lean = _sample(model, False)
    sizes = []
    real = decode_steps.PreallocatedLayer.select
    monkeypatch.setattr(decode_steps.PreallocatedLayer, "select",
                        lambda self, idx: sizes.append(len(idx)) or real(self, idx))
    _force_mode(monkeypatch, "eager")
    dropped = _sample(model, True)
    per_layer = sizes[:: model.config.num_hidden_layers]
    assert per_layer and set(per_layer) <= {4, 2, 1} and per_layer == sorted(per_layer, reverse=True)
    _same(lean, dropped)
    monkeypatch.setattr(StaticStep, "drops_rows", property(lambda self: False))
    sizes.clear()
    kept = _sample(model, True)
    assert sizes == []
    _same(dropped, kept)


def test_rows_to_keep_against_brute_force():
    """Every finished-row pattern of 1-9 rows: dynamic shapes keep exactly the unfinished rows once a quarter
    has finished; static shapes keep a halving bucket that holds every unfinished row, sorted, and at most
    twice as many rows as are unfinished (or 1)."""
    import itertools

    from opdkit.rollout.sampler import rows_to_keep

    for A in range(1, 10):
        for bits in itertools.product([False, True], repeat=A):
            done_A = torch.tensor(bits)
            live = {i for i, d in enumerate(bits) if not d}
            if not live:
                continue  # the sampler stops before asking
            dyn = rows_to_keep(done_A, False)
            assert (dyn is None) == (not (4 * (A - len(live)) >= A > 1))
            assert dyn is None or set(dyn.tolist()) == live
            buckets, b = [A], A
            while b > 1:
                b = (b + 1) // 2
                buckets.append(b)
            want = min(b for b in buckets if b >= len(live))
            got = rows_to_keep(done_A, True)
            if want == A:
                assert got is None
            else:
                kept = got.tolist()
                assert len(kept) == want and kept == sorted(set(kept)) and live <= set(kept)
                assert want <= max(1, 2 * len(live))


def test_compiled_static_step_keeps_every_row():
    model = _model()
    cache = decode_steps.make_cache("preallocated", model.config, 8, torch.float32)
    step = StaticStep(model.config, model.model, cache, torch.ones(2, 4, dtype=torch.long), 4, "preallocated",
                      torch.float32, True, mode="compile")
    assert not step.drops_rows
    with pytest.raises(RuntimeError, match="keeps every row"):
        step.select(torch.tensor([0]))
    with pytest.raises(ValueError, match="eager, compile or cuda_graph"):
        StaticStep(model.config, model.model, cache, torch.ones(2, 4, dtype=torch.long), 4, "preallocated",
                   torch.float32, True, mode="jit")


def test_static_decode_field_is_checked():
    with pytest.raises(ValueError, match="static_decode"):
        SamplingParams(static_decode="yes")


@pytest.mark.slow
def test_compiled_static_step_equals_lean_step(monkeypatch):
    """torch.compile (inductor, C++ on CPU): the same samples as the lean step, and a second call of the same
    shape reuses the compiled step (no recompile)."""
    import torch._dynamo as dynamo

    model = _model()
    lean = _sample(model, False)
    monkeypatch.setattr(graph_step, "_COMPILED", {})
    used = _force_mode(monkeypatch, "compile")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="opdkit sampler")  # no fallback: the compiled step ran
        first = _sample(model, True)
        n_frames = dynamo.utils.counters["stats"]["unique_graphs"]
        second = _sample(model, True)
        shorter = [p[:-1] or p for p in PROMPTS]  # another longest prompt, in the same length bucket
        third = sample_rollouts(model, shorter, SamplingParams(max_new_tokens=24, samples_per_prompt=2,
                                                               static_decode=True),
                                eos_token_ids=[2, 7, 11], pad_token_id=PAD, generator=torch.Generator().manual_seed(3))
    assert used == ["compile", "compile", "compile"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == n_frames  # one compiled shape for all three
    assert third.prompt_ids_BP.shape[1] == max(map(len, shorter))
    _same(lean, first)
    _same(lean, second)



def test_decoding_on_cuda_excludes_cudnn_attention():
    """cuDNN SDPA plans every new key length (60 ms each, measured on an H200): the sampler's context for
    CUDA turns it off, keeps flash / memory-efficient / math, and restores the flags afterwards."""
    from opdkit.rollout.sampler import decode_attention

    b = torch.backends.cuda
    before = (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())
    with decode_attention(torch.device("cuda")):
        assert not b.cudnn_sdp_enabled()
        assert b.flash_sdp_enabled() and b.mem_efficient_sdp_enabled() and b.math_sdp_enabled()
    assert (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),
            b.math_sdp_enabled()) == before
    with decode_attention(torch.device("cpu")):  # a no-op elsewhere
        assert (b.cudnn_sdp_enabled(), b.flash_sdp_enabled()) == before[:2]


@pytest.mark.slow
def test_cli_train_with_static_decode_matches_the_lean_step_run(tiny_models, tmp_path, monkeypatch):
    """`opdkit train ... rollout.static_decode=true` end to end on CPU (compiled step): the same rollouts and
    so the same training record as the default lean step (same seed), to float32 rounding."""
    from opdkit.cli.main import main
    from opdkit.train.telemetry import read_metrics

    student, teacher, data = tiny_models
    used = []
    real = graph_step.pick_decode_step
    monkeypatch.setattr(graph_step, "pick_decode_step", lambda *a, **kw: used.append(real(*a, **kw)) or used[-1])
    runs = {}
    for static in ("false", "true"):
        out = tmp_path / static
        rc = main(["train", f"model.student={student}", f"model.teacher={teacher}", f"data.train_file={data}",
                   "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
                   "train.train_steps=2", "train.progress=false", "train.device=cpu", f"train.output_dir={out}",
                   f"rollout.static_decode={static}"])
        assert rc == 0
        runs[static] = read_metrics(out / "metrics.jsonl", "step")
        # every sampling call of the run decoded with the step asked for (the compiled one: no fallback)
        assert {getattr(x, "mode", type(x).__name__) for x in used} == ({"compile"} if static == "true"
                                                                           else {"LeanStep"})
        used.clear()
    for a, b in zip(runs["false"], runs["true"], strict=True):
        assert a["response_len"] == b["response_len"]
        assert b["sampled_rkl"] == pytest.approx(a["sampled_rkl"], abs=1e-4)
