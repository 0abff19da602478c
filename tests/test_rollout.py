"""Rollout sampling, teacher scoring and tokenizer pre-flight on tiny random Qwen3 models (CPU, no downloads).

Tolerance for behaviour log-probs vs recomputation: 1e-4 absolute in float32 (observed ~1e-6; the
cached decode and the uncached recomputation differ only in floating-point operation order).
"""

import dataclasses

import pytest
import torch

from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.preflight import TokenizerMismatchError, check_tokenizers, newline_token_ids
from opdkit.rollout.sampler import SamplingParams, sample_rollouts
from opdkit.rollout.scoring import response_logprobs
from opdkit.rollout.teacher import score_with_teacher
from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
from opdkit.tokenizer import char_tokenizer

V, PAD = 32, 0
EOS = [2, 7, 11]
LOGP_ATOL = 1e-4
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22, 23, 24, 25]]


def _model(seed=0, vocab=V, hidden=32):
    return tiny_qwen3(TinyQwen3Spec(vocab_size=vocab, hidden_size=hidden, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=8, intermediate_size=64), seed=seed)


@pytest.fixture(scope="module")
def student():
    return _model(0)


def _sample(model, params, seed=1, **kw):
    kw = {"eos_token_ids": EOS, "pad_token_id": PAD, **kw}
    return sample_rollouts(model, PROMPTS, params, generator=torch.Generator().manual_seed(seed), **kw)


def _eos_model():
    """A model that emits EOS (id 2 or 3, by the sign of sum(h)) with probability ~1 at every step."""
    m = _model(3)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.weight[2] = 100.0
        m.lm_head.weight[3] = -100.0
    return m


def _assert_batches_equal(a: RolloutBatch, b: RolloutBatch):
    for f in dataclasses.fields(RolloutBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f.name


# --------------------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("field,value", [("temperature", 0.0), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("max_new_tokens", 0),
                                         ("min_new_tokens", -1), ("min_new_tokens", 600),
                                         ("samples_per_prompt", 0), ("top_k", 2.5), ("max_cache_gb", -1.0),
                                         ("max_cache_gb", float("inf"))])
def test_sampling_params_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# --------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("params,suppress", [(SamplingParams(top_p=0.8), False), (SamplingParams(top_p=1.0), False),
                                             (SamplingParams(temperature=2.0, top_k=3, top_p=0.95), False),
                                             (SamplingParams(top_p=1.0), True)])
def test_sample_next_matches_filtered_distribution(params, suppress):
    from opdkit.rollout.token_sampling import row_uniforms, sample_next

    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    z = logits_V / params.temperature
    if suppress:
        z[1] = float("-inf")
    p = torch.softmax(z, -1)
    keep = torch.ones(8, dtype=torch.bool)
    if params.top_k:
        keep &= z >= z.topk(params.top_k).values[-1]
    p_kept = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum()
    if params.top_p < 1:  # the mass of strictly more likely tokens is < top_p
        keep &= torch.tensor([p_kept[p_kept > p_kept[v]].sum() < params.top_p for v in range(8)])
    expected = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum()
    n = 40_000
    tok = sample_next(logits_V.expand(n, 8).clone(), params.temperature, params.top_k, params.top_p,
                      row_uniforms(12345, torch.arange(n), 3), torch.tensor([1]) if suppress else None)
    freq = torch.bincount(tok, minlength=8).double() / n
    assert (freq[~keep] == 0).all()
    torch.testing.assert_close(freq, expected.double(), atol=0.01, rtol=0)


def test_same_seed_same_batch_different_seed_differs(student):
    p = SamplingParams(max_new_tokens=12, samples_per_prompt=2)
    a, b, c = _sample(student, p, seed=1), _sample(student, p, seed=1), _sample(student, p, seed=2)
    _assert_batches_equal(a, b)
    assert not torch.equal(a.response_ids_BT[:, :4], c.response_ids_BT[:, :4])


def test_generator_state_advances_and_restores(student):
    p = SamplingParams(max_new_tokens=6)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    first = sample_rollouts(student, PROMPTS, p, eos_token_ids=EOS, pad_token_id=PAD, generator=g)
    second = sample_rollouts(student, PROMPTS, p, eos_token_ids=EOS, pad_token_id=PAD, generator=g)
    assert not torch.equal(first.response_ids_BT[:, :3], second.response_ids_BT[:, :3])
    g.set_state(state)  # a trainer restoring its checkpointed generator gets the same rollouts
    _assert_batches_equal(first, sample_rollouts(student, PROMPTS, p, eos_token_ids=EOS, pad_token_id=PAD,
                                                 generator=g))


def test_group_ids_prompt_indices_answers(student):
    p = SamplingParams(max_new_tokens=4, samples_per_prompt=3)
    b = _sample(student, p, prompt_indices=[40, 41, 42, 43], group_offset=10, answers=["a", "b", "c", "d"])
    assert b.size == 12
    assert b.group_ids_B.tolist() == [10] * 3 + [11] * 3 + [12] * 3 + [13] * 3
    assert b.prompt_index_B.tolist() == [40] * 3 + [41] * 3 + [42] * 3 + [43] * 3
    assert b.answers == [a for a in "abcd" for _ in range(3)]
    # left padding: row i·S+s holds prompt i right-aligned
    for i, prompt in enumerate(PROMPTS):
        row = 3 * i + 1
        n = int(b.prompt_mask_BP[row].sum())
        assert n == len(prompt) and b.prompt_ids_BP[row, -n:].tolist() == prompt
        assert b.prompt_mask_BP[row, : b.prompt_ids_BP.shape[1] - n].sum() == 0
    assert _sample(student, SamplingParams(max_new_tokens=2)).prompt_index_B.tolist() == [0, 1, 2, 3]


def test_eos_stops_row_and_is_kept():
    m = _eos_model()
    b = sample_rollouts(m, PROMPTS, SamplingParams(max_new_tokens=8), eos_token_ids=[2, 3], pad_token_id=PAD,
                        generator=torch.Generator().manual_seed(0))
    assert b.response_ids_BT.shape == (4, 1)
    assert b.response_mask_BT.tolist() == [[1]] * 4
    assert set(b.response_ids_BT.flatten().tolist()) <= {2, 3}
    assert b.stop_reasons == ["eos"] * 4


def test_min_new_tokens_suppresses_eos():
    m = _eos_model()
    b = sample_rollouts(m, PROMPTS, SamplingParams(max_new_tokens=8, min_new_tokens=5), eos_token_ids=[2, 3],
                        pad_token_id=PAD, generator=torch.Generator().manual_seed(0))
    assert b.response_lengths_B.tolist() == [6] * 4 and b.stop_reasons == ["eos"] * 4
    assert not torch.isin(b.response_ids_BT[:, :5], torch.tensor([2, 3])).any()
    assert torch.isin(b.response_ids_BT[:, 5], torch.tensor([2, 3])).all()


def test_stop_reasons_mask_and_padding_layout(student):
    params = SamplingParams(max_new_tokens=20, samples_per_prompt=4)
    b = _sample(student, params, eos_token_ids=[2, 3])
    lengths = b.response_lengths_B.tolist()
    assert len(set(lengths)) > 1 and b.response_ids_BT.shape[1] == max(lengths)
    for r, (n, reason) in enumerate(zip(lengths, b.stop_reasons)):
        assert b.response_mask_BT[r, :n].all() and not b.response_mask_BT[r, n:].any()
        assert (b.response_ids_BT[r, n:] == PAD).all() and (b.logp_old_BT[r, n:] == 0).all()
        ended = int(b.response_ids_BT[r, n - 1]) in (2, 3)
        assert not torch.isin(b.response_ids_BT[r, : n - 1], torch.tensor([2, 3])).any()
        assert reason == ("eos" if ended else "length")
        if reason == "length":
            assert n == 20
    assert {"eos", "length"} <= set(b.stop_reasons)


def test_top_k_1_equals_greedy_generate(student):
    N = 10
    b = _sample(student, SamplingParams(top_k=1, top_p=1.0, max_new_tokens=N, samples_per_prompt=1))
    with torch.no_grad():
        out = student.generate(input_ids=b.prompt_ids_BP, attention_mask=b.prompt_mask_BP, do_sample=False,
                               max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD)
    gen_BT = out[:, b.prompt_ids_BP.shape[1]:]
    T = b.response_ids_BT.shape[1]
    assert torch.equal(b.response_ids_BT, gen_BT[:, :T])
    assert (gen_BT[:, T:] == PAD).all()


@pytest.mark.parametrize("kv_cache", ["preallocated", "dynamic", "static"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=16, samples_per_prompt=2),
                                    SamplingParams(temperature=0.7, top_k=5, top_p=0.8, max_new_tokens=16)])
def test_logp_old_equals_recomputation(student, kv_cache, params):
    b = _sample(student, params, kv_cache=kv_cache, eos_token_ids=[2, 7, 11, 13])
    assert len(set(b.response_lengths_B.tolist())) > 1  # responses of different lengths, prompts too
    assert b.logp_old_BT.dtype == torch.float32
    with torch.no_grad():
        ref = response_logprobs(student, b).logp_BT
    m = b.response_mask_BT.bool()
    assert (ref[m] - b.logp_old_BT[m]).abs().max() <= LOGP_ATOL
    assert (b.logp_old_BT[~m] == 0).all()
    # the cache implementation does not change the samples (a static cache attends over masked
    # zero columns too, which changes the float summation order only)
    if kv_cache != "preallocated":
        ref_b = _sample(student, params, eos_token_ids=[2, 7, 11, 13])
        assert torch.equal(b.response_ids_BT, ref_b.response_ids_BT)
        torch.testing.assert_close(b.logp_old_BT, ref_b.logp_old_BT, atol=1e-5, rtol=0)


def _llama_like(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "llama":  # biases everywhere exercise the bias paths of the lean step
            return LlamaForCausalLM(LlamaConfig(**shape, attention_bias=True, mlp_bias=True)).eval()
        return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()  # q/k/v biases


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("small", [True, False])
def test_lean_step_equals_transformers_forward(student, monkeypatch, arch, small):
    """The lean decode step (fused / unfused weights) samples what the model's own forward samples."""
    from opdkit.rollout import decode_steps

    model = student if arch == "qwen3" else _llama_like(arch)
    params = SamplingParams(max_new_tokens=10, samples_per_prompt=2)
    if not small:
        monkeypatch.setattr(decode_steps, "SMALL_MODEL_PARAMS", 0)
    lean = _sample(model, params)
    monkeypatch.setattr(decode_steps, "LEAN_MODEL_TYPES", ())
    ref = _sample(model, params)
    assert torch.equal(lean.response_ids_BT, ref.response_ids_BT)
    torch.testing.assert_close(lean.logp_old_BT, ref.logp_old_BT, atol=1e-5, rtol=0)
    with torch.no_grad():
        recomputed = response_logprobs(model, lean).logp_BT
    m = lean.response_mask_BT.bool()
    assert (recomputed[m] - lean.logp_old_BT[m]).abs().max() <= LOGP_ATOL


@pytest.mark.parametrize("kv_cache", ["preallocated", "dynamic", "static"])
def test_eager_attention_generic_step_2d_mask(monkeypatch, kv_cache):
    """Non-SDPA attention takes the 2D-mask path of the generic step (transformers builds the mask)."""
    from opdkit.rollout import decode_steps

    model = _model(0)
    model.set_attn_implementation("eager")
    monkeypatch.setattr(decode_steps, "LEAN_MODEL_TYPES", ())
    b = _sample(model, SamplingParams(max_new_tokens=10, samples_per_prompt=2), kv_cache=kv_cache)
    with torch.no_grad():
        ref = response_logprobs(model, b).logp_BT
    m = b.response_mask_BT.bool()
    assert (ref[m] - b.logp_old_BT[m]).abs().max() <= LOGP_ATOL


def test_lora_wrapped_student_uses_its_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                           init_lora_weights=False))
    b = _sample(model, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        ref = response_logprobs(model, b).logp_BT  # the forward with the LoRA deltas
    m = b.response_mask_BT.bool()
    assert (ref[m] - b.logp_old_BT[m]).abs().max() <= LOGP_ATOL


def test_bf16_student_records_float32_logp(student):
    m = _model(0).to(torch.bfloat16)
    b = _sample(m, SamplingParams(max_new_tokens=8, samples_per_prompt=2), progress=True)
    assert b.logp_old_BT.dtype == torch.float32
    with torch.no_grad():
        ref = response_logprobs(m, b).logp_BT
    m_bt = b.response_mask_BT.bool()
    assert (ref[m_bt] - b.logp_old_BT[m_bt]).abs().max() <= 2e-2  # bf16 cached vs uncached forward


def test_outputs_are_autograd_usable_and_mode_restored(student):
    student.train()
    b = _sample(student, SamplingParams(max_new_tokens=3))
    assert student.training
    student.eval()
    w = torch.ones_like(b.logp_old_BT, requires_grad=True)
    (w * b.logp_old_BT * b.response_mask_BT).sum().backward()  # no "inference tensor" error
    assert w.grad is not None


def test_sampler_input_errors(student):
    p = SamplingParams(max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        sample_rollouts(student, [[1], []], p, eos_token_ids=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="outside"):
        sample_rollouts(student, [[1, V]], p, eos_token_ids=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="eos_token_ids"):
        sample_rollouts(student, [[1]], p, eos_token_ids=[], pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt_indices"):
        sample_rollouts(student, [[1]], p, eos_token_ids=EOS, pad_token_id=PAD, prompt_indices=[1, 2])


# --------------------------------------------------------------------------- teacher scoring

def _naive_teacher(teacher, b: RolloutBatch, k: int, vocab_limit=None):
    """Per row, unpadded: ``teacher(prompt + response).logits`` → log-softmax, top-k (float64)."""
    rows = []
    for r in range(b.size):
        p = b.prompt_ids_BP[r][b.prompt_mask_BP[r].bool()]
        n = int(b.response_mask_BT[r].sum())
        y = b.response_ids_BT[r, :n]
        with torch.no_grad():
            z = teacher(torch.cat([p, y])[None]).logits[0, len(p) - 1: len(p) - 1 + n].double()
        if vocab_limit is not None:
            z = z[:, :vocab_limit]
        lp = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
        top = z.topk(k, dim=-1)
        rows.append((n, lp, top.indices, top.values))
    return rows


def _check_teacher(scored: RolloutBatch, ref, k):
    T = scored.response_ids_BT.shape[1]
    assert scored.teacher_logp_BT.shape == (scored.size, T) and scored.teacher_logp_BT.dtype == torch.float32
    assert scored.teacher_topk_ids_BTK.shape == (scored.size, T, k)
    for r, (n, lp, ids, vals) in enumerate(ref):
        torch.testing.assert_close(scored.teacher_logp_BT[r, :n].double(), lp, atol=1e-4, rtol=0)
        assert torch.equal(scored.teacher_topk_ids_BTK[r, :n], ids)
        torch.testing.assert_close(scored.teacher_topk_logits_BTK[r, :n].double(), vals, atol=1e-4, rtol=0)
        assert (scored.teacher_logp_BT[r, n:] == 0).all() and (scored.teacher_lse_BT[r, n:] == 0).all()
        assert (scored.teacher_topk_ids_BTK[r, n:] == 0).all() and (scored.teacher_topk_logits_BTK[r, n:] == 0).all()


def test_score_with_teacher_matches_naive_full_logits(student):
    b = _sample(student, SamplingParams(max_new_tokens=12, samples_per_prompt=2), eos_token_ids=[2, 7, 11, 13])
    teacher = _model(seed=9, hidden=48)
    scored = score_with_teacher(teacher, b, topk=4, microbatch_size=3, chunk_size=5)
    _check_teacher(scored, _naive_teacher(teacher, b, 4), 4)
    assert b.teacher_logp_BT is None  # a copy; the input is unchanged
    assert torch.equal(scored.response_ids_BT, b.response_ids_BT)
    # micro-batching does not change the result
    one = score_with_teacher(teacher, b, topk=4, microbatch_size=100)
    torch.testing.assert_close(one.teacher_logp_BT, scored.teacher_logp_BT, atol=1e-5, rtol=0)


def test_score_with_bf16_teacher_returns_float32(student):
    b = _sample(student, SamplingParams(max_new_tokens=8), eos_token_ids=[2, 7])
    teacher = _model(seed=9, hidden=48)
    ref = score_with_teacher(teacher, b, topk=4)
    low = score_with_teacher(teacher.to(torch.bfloat16), b, topk=4)
    for name in ("teacher_logp_BT", "teacher_lse_BT", "teacher_topk_logits_BTK"):
        assert getattr(low, name).dtype == torch.float32 and getattr(low, name).device == b.logp_old_BT.device
        torch.testing.assert_close(getattr(low, name), getattr(ref, name), atol=5e-2, rtol=0)


def test_score_with_padded_teacher_vocab_on_shared_ids(student):
    alphabet = "abcdefghijklmnopqrstuvwxyz\n .,"  # 3 specials + 29 chars = 32 ids
    s_tok, t_tok = char_tokenizer(alphabet[:29]), char_tokenizer(alphabet[:29] + "ABCDEFGH")
    assert len(s_tok) == 32 and len(t_tok) == 40
    shared = check_tokenizers(s_tok, t_tok, student_vocab_size=32, teacher_vocab_size=40)
    assert shared == 32
    b = _sample(student, SamplingParams(max_new_tokens=8), eos_token_ids=[2, 7])
    teacher = _model(seed=4, vocab=40)
    scored = score_with_teacher(teacher, b, topk=5, vocab_limit=shared)
    assert scored.teacher_topk_ids_BTK.max() < 32
    _check_teacher(scored, _naive_teacher(teacher, b, 5, vocab_limit=32), 5)
    with pytest.raises(ValueError, match="vocab"):
        score_with_teacher(_model(seed=4, vocab=16), b, topk=5)


# --------------------------------------------------------------------------- preflight

def test_preflight_same_tokenizer_padded_embeddings():
    tok = char_tokenizer()
    assert check_tokenizers(tok, char_tokenizer(), student_vocab_size=96, teacher_vocab_size=128) == 96


def test_preflight_error_names_differing_token():
    s_tok = char_tokenizer("0123456789abc")
    t_tok = char_tokenizer("0123456789abX")
    with pytest.raises(TokenizerMismatchError) as e:
        check_tokenizers(s_tok, t_tok, student_vocab_size=16, teacher_vocab_size=16)
    msg = str(e.value)
    assert "id 15" in msg and "'c'" in msg and "'X'" in msg and "tokenizer" in msg
    assert isinstance(e.value, ValueError)


def test_preflight_error_names_differing_special_tokens():
    s_tok = char_tokenizer("abc")
    t_tok = char_tokenizer("abc", specials=("<|endoftext|>", "<|im_end|>", "<|im_start|>"))
    with pytest.raises(TokenizerMismatchError) as e:
        check_tokenizers(s_tok, t_tok, student_vocab_size=6, teacher_vocab_size=6)
    msg = str(e.value)
    assert "eos token differs" in msg and "<|im_start|>" in msg and "<|im_end|>" in msg


def test_preflight_eos_setting_differs_only():
    t_tok = char_tokenizer()
    t_tok.eos_token = "<|endoftext|>"  # e.g. a base checkpoint next to an instruct one
    with pytest.raises(TokenizerMismatchError, match="eos token differs.*<\\|endoftext\\|>") as e:
        check_tokenizers(char_tokenizer(), t_tok, student_vocab_size=96, teacher_vocab_size=96)
    assert "special-token settings" in str(e.value)


def test_preflight_student_tokens_beyond_teacher_vocab():
    with pytest.raises(TokenizerMismatchError, match="cannot score"):
        check_tokenizers(char_tokenizer("abcdef"), char_tokenizer("abc"), student_vocab_size=9, teacher_vocab_size=6)


def test_newline_token_ids_char_tokenizer():
    tok = char_tokenizer()
    assert newline_token_ids(tok) == [tok.convert_tokens_to_ids("\n")]
