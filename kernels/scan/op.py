"""Public gated-scan ops: ``gated_scan`` (one sequence) and ``gated_scan_kv`` (keys and values, one gate).

Shapes: B batch, H heads, T time, C channels (K, the head dim, for the layer variant).
"""

from __future__ import annotations

import torch

from .bwd import scan_bwd
from .fwd import INTERPRET, scan_fwd

_DTYPES = (torch.float32, torch.bfloat16)


def _check(name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if t.shape != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported (float32 or bfloat16)")
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"{name}: the Triton scan needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    # Any strides for (B, H, T); the channel axis must be unit-stride for coalesced loads.
    return t if t.stride(-1) == 1 else t.contiguous()


class GatedScanFunction(torch.autograd.Function):
    """Composes the forward and backward kernels for 1 or 2 sequences sharing one gate."""

    @staticmethod
    def forward(ctx, gate_logits: bool, gate, initial_state, *xs):
        outs, final, checkpoints = scan_fwd(gate, list(xs), initial_state, gate_logits)
        ctx.save_for_backward(gate, checkpoints, *xs)
        ctx.has_initial, ctx.gate_logits = initial_state is not None, gate_logits
        ctx.set_materialize_grads(False)
        return (*outs, final)

    @staticmethod
    def backward(ctx, *grads):
        gate, checkpoints, *xs = ctx.saved_tensors
        grad_outs = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads[:-1], xs)]
        need_h0 = ctx.has_initial and ctx.needs_input_grad[2]
        dgate, dxs, dh0 = scan_bwd(gate, xs, checkpoints, grad_outs, grads[-1], need_h0, ctx.gate_logits)
        return (None, dgate, dh0, *dxs)


def gated_scan(gate: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None = None):
    """``h_t = gate_t * h_{t-1} + (1 - gate_t) * x_t`` along time (docs/spec.md §1.2 step 5).

    Args:
        gate: (B, H, T, C) in (0, 1), float32 or bfloat16.
        x: (B, H, T, C), float32 or bfloat16. Any strides with a unit-stride channel axis.
        initial_state: (B, H, C) state before step 0, or None for zeros.
    Returns:
        ``h`` (B, H, T, C) in ``x.dtype`` and the final state (B, H, C) in float32. The state and all
        arithmetic are float32. Differentiable in gate, x and initial_state. T may be 0: the final state is
        then the initial one (zeros without it).
    Raises:
        ValueError: on mismatched shapes, unsupported dtypes or CPU tensors outside the interpreter.
    """
    if x.dim() != 4:
        raise ValueError(f"gated_scan: x must be (B, H, T, C), got shape {tuple(x.shape)}")
    x = _check("x", x, x.shape)
    gate = _check("gate", gate, x.shape)
    h0 = None
    if initial_state is not None:
        h0 = _check("initial_state", initial_state, x.shape[:2] + x.shape[3:]).unsqueeze(0).contiguous()
    h, final = GatedScanFunction.apply(False, gate, h0, x)
    return h, final[0]


def gated_scan_kv(gate: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None = None,
                  *, gate_logits: bool = False):
    """The layer's recurrence: keys and values scanned with the same gate, read once per step.

    Args:
        gate: (B, H, T, K) forget gate f in (0, 1) (float32 per spec §1.8, or bfloat16); with ``gate_logits``
            its pre-activation g instead (f = sigmoid(g) in fp32 inside the kernel, and the gradient returned
            is g's), typically a strided view of the projection output, read in place.
        k, v: (B, H, T, K), float32 or bfloat16 (views with a unit-stride last axis are read in place).
        initial_state: (2, B, H, K) states of k̃ and ṽ before step 0, or None for zeros.
    Returns:
        ``(k̃, ṽ, final_state)``: k̃ and ṽ (B, H, T, K) in the dtypes of k and v, the final state (2, B, H, K)
        float32. Differentiable in gate, k, v and initial_state.
    Raises:
        ValueError: on mismatched shapes, unsupported dtypes or CPU tensors outside the interpreter.
    """
    if k.dim() != 4:
        raise ValueError(f"gated_scan_kv: k must be (B, H, T, K), got shape {tuple(k.shape)}")
    k = _check("k", k, k.shape)
    v = _check("v", v, k.shape)
    gate = _check("gate", gate, k.shape)
    h0 = None
    if initial_state is not None:
        h0 = _check("initial_state", initial_state, (2,) + k.shape[:2] + k.shape[3:]).contiguous()
    k_out, v_out, final = GatedScanFunction.apply(gate_logits, gate, h0, k, v)
    return k_out, v_out, final
