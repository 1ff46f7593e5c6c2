"""The elementwise glue between the matmuls and the fused kernels — RMSNorm, RoPE, the output gate — as plain
functions, and their ``torch.compile``d versions (``train.compile_glue``; ``train/engine.py`` points the
model at them).

Only these functions are compiled, never a whole block: the Triton kernels, the tensor-parallel layers and the
context-parallel collectives stay outside every compiled graph, so nothing needs registering as a custom op and
no graph breaks at a collective.
"""

from __future__ import annotations

import functools

import torch

from . import ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference model's RMSNorm: fp32 statistics, the input's dtype before the gain, the weight's after."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(x.dtype)).to(weight.dtype)


def rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float):
    """RoPE on queries and keys at ``positions``."""
    return ops.apply_rotary(q, positions, theta), ops.apply_rotary(k, positions, theta)


def output_gate(a: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Attention output (B, H, T, K) to [T, B, H*K], times sigmoid of the gate pre-activation o [T, B, H*K]."""
    return a.permute(2, 0, 1, 3).flatten(2) * torch.sigmoid(o)


@functools.cache
def compiled(fn):
    """``fn`` compiled once per process (shapes specialise inside torch.compile's own cache)."""
    return torch.compile(fn)
