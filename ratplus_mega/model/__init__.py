"""The training model: RAT+ built from megatron-core tensor-parallel layers (TP=1 is a case of TP=N)."""

from .init import build_model
from .lm import RatPlusLM

__all__ = ["RatPlusLM", "build_model"]
