"""Settings shared by every command: field help, validation errors that name the fix, the model settings.

``opdkit train``'s :class:`opdkit.config.Config`, :func:`opdkit.eval.runner.evaluate`,
:class:`opdkit.diagnose.runner.DiagnoseSettings` and the demo all describe a model with
:class:`ModelSettings`, sampling with :class:`opdkit.rollout.sampler.SamplingParams` and prompts with
:class:`opdkit.runtime.prompts.PromptSettings`; every field has a help text (:func:`F`) and the lists
of valid names come from the registries, not from copies.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from opdkit.runtime.models import DEVICE_CHOICES, DTYPE_CHOICES


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class _Raw(str):
    """A command-line override value: kept verbatim for str fields, read as YAML for the others."""



def _coerce(value: Any, tp: Any, key: str):
    """``value`` as the field type ``tp`` (a command-line :class:`_Raw` is read as YAML first), or ConfigError."""
    if isinstance(value, _Raw):
        value = str(value) if tp is str else (yaml.safe_load(value) if value != "" else "")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(tp, types.UnionType) or origin is typing.Union:
        return value
    else:
        return value
    raise ConfigError(f"{key} = {value!r} has the wrong type; expected {getattr(tp, '__name__', tp)}")


def apply_mapping(obj, data: dict, prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from nested ``data`` (typed by :func:`_coerce`); unknown names raise."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown field {key!r}; valid fields here: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be a mapping of its fields")
            apply_mapping(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def parse_overrides(overrides: list[str]) -> dict:
    """``["loss.name=lsm", "train.train_steps=10"]`` -> nested dict of raw values (typed when applied)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value, e.g. loss.name=lsm")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _Raw(raw)
    return out


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
