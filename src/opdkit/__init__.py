"""opdkit: on-policy distillation of language models for long-horizon reasoning."""

__version__ = "0.1.0"
