"""Shared fixtures: tiny random Qwen3 student / teacher and a prompt file, saved locally and loaded by path."""

import json

import pytest
import torch

from opdkit.runtime.models import TinyQwen3Spec, tiny_qwen3
from opdkit.tokenizer import char_tokenizer

torch.set_num_threads(1)

STUDENT = TinyQwen3Spec(vocab_size=0, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                        intermediate_size=64)
TEACHER = TinyQwen3Spec(vocab_size=0, hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                        intermediate_size=96)


def save_tiny(path, spec, tok, seed, vocab_size=None):
    from dataclasses import replace

    model = tiny_qwen3(replace(spec, vocab_size=vocab_size or len(tok)), seed=seed,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(student_dir, teacher_dir, prompts.jsonl) written with save_pretrained / JSON Lines."""
    root = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    student = save_tiny(root / "student", STUDENT, tok, seed=1)
    teacher = save_tiny(root / "teacher", TEACHER, tok, seed=2)
    data = root / "prompts.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"p{i}", "problem": f"{i}+{i + 1}=?", "answer": str(2 * i + 1)}) + "\n")
    return student, teacher, data
