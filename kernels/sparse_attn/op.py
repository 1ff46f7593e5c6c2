"""Public sparse-attention op: causal attention under the (D, W, P) pattern (docs/spec.md §1.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bwd import attention_bwd
from .fwd import INTERPRET, attention_fwd
from .gathered import GatheredKeys, plan_gathered_keys

_DTYPES = (torch.float32, torch.bfloat16)
# The kernels launch (tiles, heads, batch) grids, and CUDA caps a grid's second and third axes at 65535 programs.
MAX_BATCH_OR_HEADS = 65535


@dataclass(frozen=True)
class Pattern:
    """Non-tensor options of one call: dilation D (>= 1, or -1 for none), window W, sinks P, softmax scale and
    the absolute position of the first query."""

    dilation: int
    window: int
    sinks: int
    scale: float
    q_offset: int


class SparseAttentionFunction(torch.autograd.Function):
    """Composes the forward kernel and the backward kernels (FA2 recomputation from the saved LSE)."""

    @staticmethod
    def forward(ctx, q, k, v, pattern: Pattern, gathered: GatheredKeys | None):
        out, lse = attention_fwd(q, k, v, pattern, gathered)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.gathered = pattern, gathered
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = attention_bwd(q, k, v, out, lse, grad_out, grad_lse, ctx.pattern, ctx.gathered)
        return dq, dk, dv, None, None


def _check(name: str, t: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    if t.dim() != 4:
        raise ValueError(f"sparse_attention: {name} must be (B, H, T, K), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES or (ref is not None and t.dtype != ref.dtype):
        raise ValueError(f"sparse_attention: {name} dtype {t.dtype}; q, k, v must share float32 or bfloat16")
    if ref is not None and (t.shape[:2] != ref.shape[:2] or t.shape[3] != ref.shape[3]):
        raise ValueError(f"sparse_attention: {name} shape {tuple(t.shape)} does not match q {tuple(ref.shape)}")
    if not (t.is_cuda or INTERPRET):
        raise ValueError("sparse_attention: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dilation: int,
    window: int,
    sinks: int,
    scale: float | None = None,
    *,
    q_offset: int = 0,
    k_positions: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Causal attention in which a query at position q sees the keys k <= q with (k + 1) % D == 0 (grid),
    q - k <= W (window, inclusive: W + 1 keys) or k < P (sinks). D = 1 is dense causal; D = -1 has no grid.

    Args:
        q: (B, H, Tq, K) at absolute positions ``q_offset .. q_offset + Tq - 1``.
        k, v: (B, H, Tk, K) at positions ``0 .. Tk - 1``, Tk >= q_offset + Tq; same dtype as q (float32 or
            bfloat16). Any strides with a unit-stride last axis.
        k_positions: optional (Tk,) integer tensor, sorted ascending: the keys are then a gathered set at these
            global positions (context parallelism: sinks and grid keys of earlier ranks beside the local ones).
            A query none of whose allowed keys is present gets a zero output and an LSE of -inf, so partial
            results over disjoint key sets merge exactly by their LSEs. Costs two host syncs per call.
        scale: softmax scale, default K ** -0.5.
    Returns:
        out (B, H, Tq, K) in q's dtype; with ``return_lse`` also the natural-log log-sum-exp of the scaled scores
        (B, H, Tq) float32, itself differentiable. Gradients flow to q, k and v.
    Raises:
        ValueError: on a bad pattern, too few keys, bad ``k_positions``, mismatched shapes or dtypes, over 65535
            sequences or heads, or CPU tensors outside the interpreter.
    """
    q = _check("q", q, None)
    if max(q.shape[:2]) > MAX_BATCH_OR_HEADS:
        raise ValueError(f"sparse_attention: at most {MAX_BATCH_OR_HEADS} sequences and as many heads per call (CUDA's "
                         f"grid limit), got B={q.shape[0]}, H={q.shape[1]}; split the batch")
    k, v = _check("k", k, q), _check("v", v, q)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"sparse_attention: k has {k.shape[2]} positions, v {v.shape[2]}")
    if q_offset < 0 or (k_positions is None and k.shape[2] < q_offset + q.shape[2]):
        raise ValueError(f"sparse_attention: {k.shape[2]} keys cannot cover queries at {q_offset}.."
                         f"{q_offset + q.shape[2] - 1}")
    if not (dilation >= 1 or dilation == -1) or window < 0 or sinks < 0:
        raise ValueError(f"sparse_attention: bad pattern D={dilation} W={window} P={sinks} (D >= 1 or -1; W, P >= 0)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    pattern = Pattern(int(dilation), int(window), int(sinks), scale, int(q_offset))
    gathered = None
    if k_positions is not None:
        gathered = plan_gathered_keys(k_positions, pattern.q_offset, q.shape[2], k.shape[2], pattern.dilation,
                                      pattern.window, pattern.sinks, q.device)
    out, lse = SparseAttentionFunction.apply(q, k, v, pattern, gathered)
    return (out, lse) if return_lse else out
