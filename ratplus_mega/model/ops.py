"""The one place the training model picks its compute kernels.

Fused Triton kernels (``ratplus_mega.kernels``) on CUDA when they provide the op; otherwise the reference
model's pure-torch functions, so the CPU path runs exactly the code the parity tests hold as truth.
``RATPLUS_DISABLE_KERNELS=1`` selects the torch functions on CUDA too (the same switch as the reference model's).
"""

from __future__ import annotations

import os

import torch

from ..hf.modeling_ratplus import DENSE, apply_rotary, gated_scan, sparse_attention


Pattern = tuple[int, int, int]

__all__ = ["DENSE", "apply_rotary", "attention", "recurrence"]


def _kernel(name: str, tensor: torch.Tensor):
    """Imported on first use with a CUDA tensor, so CPU runs never load Triton."""
    if not tensor.is_cuda or os.environ.get("RATPLUS_DISABLE_KERNELS", "0") == "1":
        return None
    try:
        from .. import kernels
    except ImportError:  # no Triton on this platform
        return None
    return getattr(kernels, name, None)


def recurrence(g: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None = None):
    """Scan k and v (B, H, T, K) with the forget gate f = sigmoid(g) in fp32, g (B, H, T, K) its pre-activation
    (the kernel takes the sigmoid on load: no fp32 gate is stored for backward); returns k̃, ṽ (input dtype)
    and the final state (2, B, H, K) in fp32."""
    fused = _kernel("gated_scan_kv", k)
    if fused is not None:
        return fused(g, k, v, initial_state, gate_logits=True)
    h, state = gated_scan(torch.sigmoid(g.float()), torch.stack([k, v]), initial_state)
    return h[0], h[1], state


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *, q_offset: int = 0,
              k_positions: torch.Tensor | None = None):
    """Causal attention of q (B, H, Tq, K) at global positions q_offset.. over k, v (B, H, Tk, K) at positions
    0..Tk-1, or at ``k_positions`` when the keys are a gathered set (context parallelism)."""
    fused = _kernel("sparse_attention", q)
    if fused is not None and k_positions is None:
        return fused(q, k, v, *pattern, q_offset=q_offset)
    return sparse_attention(q, k, v, *pattern, q_offset=q_offset, k_positions=k_positions)
