"""The self-contained HuggingFace reference model (copied verbatim into exported checkpoints).

Its names are imported on first use, so that ``ratplus_mega.hf.cache_layout`` (pure arithmetic) can be read
without importing torch and transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["RatPlusConfig", "RatPlusForCausalLM", "RatPlusModel", "gated_scan", "sparse_attention"]

_HOMES = {"RatPlusConfig": "configuration_ratplus", "RatPlusForCausalLM": "modeling_ratplus",
          "RatPlusModel": "modeling_ratplus", "gated_scan": "modeling_ratplus", "sparse_attention": "modeling_ratplus"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
