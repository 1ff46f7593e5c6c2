"""The self-contained HuggingFace reference model (copied verbatim into exported checkpoints)."""

from .configuration_ratplus import RatPlusConfig
from .modeling_ratplus import RatPlusForCausalLM, RatPlusModel, gated_scan, sparse_attention

__all__ = ["RatPlusConfig", "RatPlusForCausalLM", "RatPlusModel", "gated_scan", "sparse_attention"]
