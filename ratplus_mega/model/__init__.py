"""The training model: RAT+ built from megatron-core tensor-parallel layers (TP=1 is a case of TP=N)."""

from .lm import RatPlusLM, build_model

__all__ = ["RatPlusLM", "build_model"]
