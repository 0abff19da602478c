"""Settings shared by every command: field help, validation errors that name the fix, the model settings.

``opdkit train``'s :class:`opdkit.config.Config`, :func:`opdkit.eval.runner.evaluate`,
:class:`opdkit.diagnose.runner.DiagnoseSettings` and the demo all describe a model with
:class:`ModelSettings`, sampling with :class:`opdkit.rollout.sampler.SamplingParams` and prompts with
:class:`opdkit.runtime.prompts.PromptSettings`; every field has a help text (:func:`F`) and the lists
of valid names come from the registries, not from copies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opdkit.runtime.models import DEVICE_CHOICES, DTYPE_CHOICES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def F(default: Any = dataclasses.MISSING, help: str = "", **kw):  # noqa: A002
    """A dataclass field with a help text (mutable defaults via ``default_factory``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def check_choice(key: str, value: Any, options: Iterable[str]) -> None:
    options = tuple(options)
    if value not in options:
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of {', '.join(options)}")


def check_device(key: str, value: str) -> None:
    if value not in DEVICE_CHOICES and not value.startswith("cuda:"):
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


@dataclass
class ModelSettings:
    """One model to load (eval, diagnose, a teacher); :meth:`load` resolves device, dtype and tokenizer."""

    path: str = F("", "save_pretrained directory or hub id")
    tokenizer: str = F("", "tokenizer path or id (default: the model's)")
    dtype: str = F("auto", "auto (bfloat16 for a model that only runs forward passes on a GPU, else float32), "
                           "float32, bfloat16, float16")
    device: str = F("auto", "auto (cuda when available, else cpu), cpu, cuda")
    trust_remote_code: bool = F(False, "allow model code from the hub (off: only transformers' own code)")

    def validate(self, prefix: str = "model", *, flags: bool = False) -> ModelSettings:
        """Check the values and that the model and tokenizer sources exist (before anything loads); with
        ``flags`` the messages name the command-line flags (``--model``, ``--tokenizer``, ...)."""
        from opdkit.runtime.models import check_model_source

        name = (lambda f: "--" + {"path": "model"}.get(f, f)) if flags else (lambda f: f"{prefix}.{f}")
        if not self.path:
            raise ConfigError(f"{name('path')} is required: a save_pretrained directory or a hub id")
        check_choice(name("dtype"), self.dtype, DTYPE_CHOICES)
        check_device(name("device"), self.device or "auto")
        for f in ("path", "tokenizer"):
            if getattr(self, f) and (why := check_model_source(getattr(self, f), name(f))):
                raise ConfigError(why)
        return self

    def load(self):
        """``(model, tokenizer)``: the model frozen (eval mode, no gradients) on the resolved device (call
        :meth:`validate` first for errors that name the field)."""
        from opdkit.runtime.models import load_frozen, load_tokenizer

        tok = load_tokenizer(self.tokenizer or self.path, trust_remote_code=self.trust_remote_code)
        model = load_frozen(self.path, dtype=self.dtype, device=self.device or "auto",
                            trust_remote_code=self.trust_remote_code)
        return model, tok


def field_help(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field of a (nested) settings dataclass, for ``--help``."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(inst):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            rows += field_help(type(v), prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, repr(v), f.metadata.get("help", "")))
    return rows
