"""Public sparse-attention op: causal attention under the (D, W, P) pattern (docs/spec.md §1.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import BlockPlan, block_attention_bwd, block_attention_fwd, plan_blocks, tile_shape
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


class BlockAttentionFunction(torch.autograd.Function):
    """The selected-blocks kernels with the same saved-LSE recomputation."""

    @staticmethod
    def forward(ctx, q, k, v, block_ids, block_size: int, plan: BlockPlan, pattern: Pattern):
        out, lse = block_attention_fwd(q, k, v, block_ids, block_size, plan, pattern)
        ctx.save_for_backward(q, k, v, out, lse, block_ids)
        ctx.block_size, ctx.plan, ctx.pattern = block_size, plan, pattern
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, block_ids = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = block_attention_bwd(q, k, v, out, lse, grad_out, grad_lse, block_ids, ctx.block_size,
                                         ctx.plan, ctx.pattern)
        return dq, dk, dv, None, None, None, None


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


def _pattern(q: torch.Tensor, dilation: int, window: int, sinks: int, scale: float | None, q_offset: int) -> Pattern:
    if not (dilation >= 1 or dilation == -1) or window < 0 or sinks < 0:
        raise ValueError(f"sparse_attention: bad pattern D={dilation} W={window} P={sinks} (D >= 1 or -1; W, P >= 0)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return Pattern(int(dilation), int(window), int(sinks), scale, int(q_offset))


def _check_qkv(q, k, v, q_offset: int, gathered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = _check("q", q, None)
    if max(q.shape[:2]) > MAX_BATCH_OR_HEADS:
        raise ValueError(f"sparse_attention: at most {MAX_BATCH_OR_HEADS} sequences and as many heads per call (CUDA's "
                         f"grid limit), got B={q.shape[0]}, H={q.shape[1]}; split the batch")
    k, v = _check("k", k, q), _check("v", v, q)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"sparse_attention: k has {k.shape[2]} positions, v {v.shape[2]}")
    if q_offset < 0 or (not gathered and k.shape[2] < q_offset + q.shape[2]):
        raise ValueError(f"sparse_attention: {k.shape[2]} keys cannot cover queries at {q_offset}.."
                         f"{q_offset + q.shape[2] - 1}")
    return q, k, v


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
    q, k, v = _check_qkv(q, k, v, q_offset, gathered=k_positions is not None)
    pattern = _pattern(q, dilation, window, sinks, scale, q_offset)
    gathered = None
    if k_positions is not None:
        gathered = plan_gathered_keys(k_positions, pattern.q_offset, q.shape[2], k.shape[2], pattern.dilation,
                                      pattern.window, pattern.sinks, q.device)
    out, lse = SparseAttentionFunction.apply(q, k, v, pattern, gathered)
    return (out, lse) if return_lse else out


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_ids: torch.Tensor,
    block_size: int,
    dilation: int,
    window: int,
    sinks: int,
    scale: float | None = None,
    *,
    q_offset: int = 0,
    return_lse: bool = False,
    check_ids: bool = True,
):
    """The selected part of top-k block attention (docs/spec.md §4.5): each query sees the keys of the blocks it
    lists (block n: keys n·S .. n·S + S - 1) that precede it and that the (D, W, P) rule of ``sparse_attention``
    does not give it. The two parts cover disjoint keys, so their results merge by their LSEs into the
    attention over the union. A query that sees no key here gets a zero output and an LSE of -inf.

    Args:
        q: (B, H, Tq, K) at positions ``q_offset .. q_offset + Tq - 1``; k, v: (B, H, Tk, K) at 0 .. Tk - 1,
            as for ``sparse_attention``.
        block_ids: (B, H, Tq, n) integers in 0 .. ceil(Tk / S) - 1: the blocks each query lists (repeats allowed).
        block_size: S >= 1.
        dilation, window, sinks: the (D, W, P) pattern whose keys are left out.
        check_ids: check the ids' range (one host sync); a caller whose ids are in range by construction may
            skip it, keeping the GPU queue free of syncs.
    Returns:
        out (B, H, Tq, K) in q's dtype; with ``return_lse`` also the LSE (B, H, Tq) float32, differentiable.
    Raises:
        ValueError: on bad shapes, dtypes, pattern or block ids.
    """
    q, k, v = _check_qkv(q, k, v, q_offset, gathered=False)
    pattern = _pattern(q, dilation, window, sinks, scale, q_offset)
    if block_size < 1:
        raise ValueError(f"block_attention: block_size must be >= 1, got {block_size}")
    n_blocks = -(-k.shape[2] // block_size)
    if (block_ids.dim() != 4 or block_ids.shape[:3] != q.shape[:3] or block_ids.is_floating_point()
            or block_ids.dtype == torch.bool or block_ids.device != q.device):
        raise ValueError(f"block_attention: block_ids must be (B, H, Tq, n) integers on q's device, matching q "
                         f"{tuple(q.shape[:3])}; got {tuple(block_ids.shape)} {block_ids.dtype} on {block_ids.device}")
    if check_ids and block_ids.numel() and bool(((block_ids < 0) | (block_ids >= n_blocks)).any()):
        raise ValueError(f"block_attention: block ids must lie in 0 .. {n_blocks - 1} ({k.shape[2]} keys in blocks "
                         f"of {block_size})")
    block_ids = block_ids.to(torch.int32).contiguous()
    plan = plan_blocks(block_ids, n_blocks, tile_shape(q.dtype, block_size)[0])
    out, lse = BlockAttentionFunction.apply(q, k, v, block_ids, int(block_size), plan, pattern)
    return (out, lse) if return_lse else out
