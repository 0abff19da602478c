"""Compatibility location: the model helpers live in :mod:`opdkit.runtime.models`."""

from opdkit.runtime.models import (  # noqa: F401
    DTYPE_CHOICES,
    TinyQwen3Spec,
    auto_dtype,
    check_model_source,
    default_device,
    eos_token_ids,
    load_model,
    load_tokenizer,
    require_model_sources,
    resolve_device,
    resolve_dtype,
    tiny_qwen3,
)
