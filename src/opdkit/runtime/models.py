"""Model and tokenizer loading with device, dtype and EOS resolution; tiny random Qwen3 models.

Every command (train, eval, diagnose, bench, demo) loads models through here, so "auto" means the
same thing everywhere: device ``auto`` is CUDA when available, else CPU; dtype ``auto`` is bfloat16
for a model that only runs forward passes on a GPU and float32 otherwise (a trained model keeps
float32 master weights; the trainer adds bf16 autocast on GPU).

Loading is safe by default: weights through safetensors (``use_safetensors=True``), and
``trust_remote_code`` off unless the caller turns it on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / 'fp32' / ... -> torch dtype; raises listing the valid names."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}") from None


#: Names a dtype setting may take: ``auto`` plus every explicit name :func:`resolve_dtype` knows.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: optim.adamw -> (device) -> torch's fused AdamW kernel? "auto": on CUDA (transformers' Trainer default there,
#: ``adamw_torch_fused``); on CPU torch's own default (the miniature's figures were measured with it, and fused
#: rounds differently by an ulp). Fused on CPU: 1.6-1.8 ms against 5.5-5.9 ms per step for the bench student.
ADAMW: dict[str, Callable[[torch.device], bool]] = {
    "auto": lambda device: device.type == "cuda",
    "fused": lambda device: True,
    "torch_default": lambda device: False,
}
#: transformers' attention implementations a model may be loaded with (``attn_implementation``); sdpa is
#: transformers' default. On CPU, eager (two matmuls and a float32 softmax) measured faster than SDPA's flash
#: kernel for the bench workload's 148-token rows (teacher scoring and the update, README #15); it keeps a
#: rows x heads x T x T score tensor per layer for backward, so it is for short sequences.
ATTN_CHOICES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
#: train.autocast -> (device) -> bf16 autocast of the student's forwards (float32 master weights)?
AUTOCAST: dict[str, Callable[[torch.device], bool]] = {
    "auto": lambda device: device.type == "cuda",
    "bf16": lambda device: True,
    "off": lambda device: False,
}


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` / ``""`` / None -> CUDA when available, else CPU; anything else -> ``torch.device(name)``."""
    if isinstance(name, torch.device):
        return name
    return default_device() if name in (None, "", "auto") else torch.device(name)


def auto_dtype(name: str, device: torch.device, *, trains: bool = False) -> str:
    """Resolve a dtype setting: ``auto`` -> bfloat16 for a frozen model on a GPU, else float32."""
    if name != "auto":
        resolve_dtype(name)  # raises listing the valid names
        return name
    return "bfloat16" if device.type == "cuda" and not trains else "float32"


def eos_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS and every EOS of the model's generation config
    (Qwen-style models list several there, e.g. ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
    e = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(e) if isinstance(e, list) else ({e} if isinstance(e, int) else set())
    return sorted(ids)


def single_token_ids(tokenizer, tokens: list[str], *, field: str = "loss.special_tokens") -> list[int]:
    """One id per token string: its vocabulary entry, or the one id its text encodes to. A string that is
    neither raises ``ValueError`` naming ``field`` (the config field the strings came from)."""
    ids = []
    for t in tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or tid == tokenizer.unk_token_id:
            enc = tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"{field}: {t!r} is not a single token of this tokenizer (it encodes to "
                                 f"{len(enc)} ids); list tokens of the student's vocabulary")
            tid = enc[0]
        ids.append(int(tid))
    return ids


@dataclass(frozen=True)
class TinyQwen3Spec:
    """Shape of a small random Qwen3 decoder (counts name their unit)."""

    vocab_size: int
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False


def tiny_qwen3(spec: TinyQwen3Spec, *, seed: int = 0, pad_token_id: int | None = None,
               bos_token_id: int | None = None, eos_token_id: int | None = None):
    """A randomly initialised ``Qwen3ForCausalLM`` with the given shape (float32, eval mode)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    return model.eval()


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(value: str, field: str) -> str | None:
    """Why ``value`` cannot be loaded (one line naming ``field`` and the fix), or None when it can.

    Checked before any model loads (``--dry-run`` too): an existing path must be a readable directory with
    a ``config.json``; anything else must be a hub id that is in the local Hugging Face cache, or one
    that may be downloaded (not with ``HF_HUB_OFFLINE=1``)."""
    p = Path(value).expanduser()
    if p.exists():
        if not p.is_dir():
            return f"{field} = {value!r} is a file; give the directory save_pretrained wrote"
        if not os.access(p, os.R_OK | os.X_OK):
            return f"{field} = {value!r} is not readable (permissions); fix them or copy the model"
        if not (p / "config.json").is_file():
            return f"{field} = {value!r} has no config.json: not a save_pretrained directory"
        return None
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value
    if looks_local or not _HUB_ID_RE.match(value):
        return f"{field} = {value!r}: no such directory; give a save_pretrained directory or a hub id"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(value, "config.json")
    if isinstance(cached, str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return (f"{field} = {value!r}: no such directory, and this hub id is not in the local cache while "
                f"HF_HUB_OFFLINE is set; download it first (`hf download {value}`) or give a local path")
    return None


def require_model_sources(fields: list[tuple[str, str]], error=ValueError) -> None:
    """Raise ``error`` with :func:`check_model_source`'s line for the first unloadable ``(field, value)``."""
    for name, value in fields:
        if value and (why := check_model_source(value, name)):
            raise error(why)


def _first_line(e: Exception) -> str:
    """The first line of an exception's message (transformers' OSErrors run to several lines)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(path_or_id: str | Path, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """Load a causal LM with ``from_pretrained`` from a local path or hub id (safetensors only)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path_or_id), **kwargs)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load a causal LM from {str(path_or_id)!r} ({_first_line(e)}); give a directory written by "
            "save_pretrained (with model.safetensors) or a hub id that is in the local cache") from e
    return model.to(device or default_device())


def load_tokenizer(path_or_id: str | Path, *, trust_remote_code: bool = False):
    """Load a tokenizer with ``AutoTokenizer.from_pretrained``; sets pad = eos when pad is missing."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path_or_id), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"could not load a tokenizer from {str(path_or_id)!r} ({_first_line(e)}); give a "
                                "save_pretrained directory with the tokenizer files or a cached hub id") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_frozen(path_or_id: str | Path, *, dtype: str = "auto", device: str | torch.device = "auto",
                trust_remote_code: bool = False):
    """A model that only runs forward passes (eval, diagnose, a teacher): resolved dtype, eval mode,
    no gradients."""
    dev = resolve_device(device)
    model = load_model(path_or_id, dtype=auto_dtype(dtype, dev), device=dev, trust_remote_code=trust_remote_code)
    return model.eval().requires_grad_(False)
