"""Fused Triton kernels for RAT+ (installed as ``ratplus_mega.kernels``; imports nothing else of the project).

The reference model and the training model look kernels up by name and fall back to the pure-torch
functions of ``ratplus_mega/hf/modeling_ratplus.py`` when one is absent or the tensors are not on CUDA.
"""

from .scan import gated_scan, gated_scan_kv
from .sparse_attn import block_attention, sparse_attention

__all__ = ["block_attention", "gated_scan", "gated_scan_kv", "sparse_attention"]
