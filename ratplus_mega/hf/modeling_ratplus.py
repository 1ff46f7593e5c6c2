"""RAT+ reference model: pure PyTorch, self-contained (it ships inside every exported checkpoint).

RAT+ (arXiv 2602.18196) runs attention over keys and values that first pass through a full-sequence gated
linear recurrence; the same model runs dense causal attention or the dilated sparse pattern (grid keys +
local window + sink tokens) of docs/spec.md §1.3, and decodes with a compressed cache (§4.2) holding only
the sinks, the window ring, the grid keys and the fp32 recurrence state.

This file is the project's numerical truth: the training model, the fused kernels and every export are tested
against it. It imports nothing from the training stack except, optionally, fused CUDA kernels for speed
(``RATPLUS_DISABLE_KERNELS=1`` turns them off, as the tests do).

Shapes: B batch, T time, H heads, K head dim, C channels; attention tensors are (B, H, T, K) like SDPA.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_layout import (cache_regions, cache_slots, head_groups, is_per_head, layer_cache_slots,  # noqa: F401
                           summary_slots, topk_of)
from .configuration_ratplus import RatPlusConfig

Pattern = tuple  # a head pattern (D, W, P) or (D, W, P, K, S, score), or one per head (cache_layout.py)
DENSE: Pattern = (1, 0, 0)

_kernels = None  # the fused Triton kernels, imported on first use with a CUDA tensor; False when absent


def _fused(name: str, tensor: torch.Tensor):
    """The fused kernel ``name`` of the ratplus-mega package for CUDA tensors, or None (torch path)."""
    global _kernels
    if not tensor.is_cuda or os.environ.get("RATPLUS_DISABLE_KERNELS", "0") == "1":
        return None
    if _kernels is None:
        try:
            from ratplus_mega import kernels as module
        except ImportError:  # this file runs without the training stack (an exported checkpoint)
            module = False
        _kernels = module
    return getattr(_kernels, name, None) if _kernels else None


# --------------------------------------------------------------------------------------------------------------
# The gated linear recurrence (spec §1.2 step 5)
# --------------------------------------------------------------------------------------------------------------


def _shift(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """``t`` moved k steps later along time (dim -2), the first k steps filled with ``fill``."""
    return F.pad(t[..., :-k, :], (0, 0, k, 0), value=fill)


def gated_scan(
    gate: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = gate_t * h_{t-1} + (1 - gate_t) * x_t`` along time, in fp32.

    Args:
        gate: (..., T, C) in (0, 1), broadcastable to ``x`` (one gate may drive several sequences).
        x: (..., T, C).
        initial_state: (..., C) state before step 0, or None for zeros.
    Returns:
        ``h`` (..., T, C) in ``x.dtype`` and the final state (..., C) in fp32. Differentiable in all inputs.

    A Hillis–Steele prefix scan over the pairs (a, b) with (a1, b1) ∘ (a2, b2) = (a2·a1, a2·b1 + b2): log2(T)
    elementwise steps, no exp/log, so no overflow however long the memory.
    """
    a = gate.float()
    b = (1 - a) * x.float()
    step = 1
    while step < b.shape[-2]:
        b = b + a * _shift(b, step, 0.0)  # uses a before it is updated
        a = a * _shift(a, step, 1.0)
        step *= 2
    if initial_state is not None:
        b = b + a * initial_state.float().unsqueeze(-2)
    if b.shape[-2] == 0:  # no steps: the state passes through
        state = b.new_zeros(b.shape[:-2] + b.shape[-1:])
        return b.to(x.dtype), state if initial_state is None else state + initial_state.float()
    return b.to(x.dtype), b[..., -1, :]


def recurrence(g: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state=None):
    """Scan keys and values with the same gate f = sigmoid(g) in fp32, g its pre-activation (the fused kernel
    takes the sigmoid itself); returns k̃, ṽ (input dtype) and the (2, B, H, K) fp32 state."""
    fused = _fused("gated_scan_kv", k)
    if fused is not None:
        return fused(g, k, v, initial_state, gate_logits=True)
    h, state = gated_scan(torch.sigmoid(g.float()), torch.stack([k, v]), initial_state)
    return h[0], h[1], state


# --------------------------------------------------------------------------------------------------------------
# Rotary embedding (spec §1.2 step 6)
# --------------------------------------------------------------------------------------------------------------


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE over the full head dim at absolute ``positions`` (T,); fp32 math, ``x.dtype`` result."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # (T, K)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * angles.cos() + rotated * angles.sin()).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# Attention (spec §1.3)
# --------------------------------------------------------------------------------------------------------------


def grid_start(dilation: int, sinks: int) -> int:
    """First grid position at or after the sinks: the smallest p >= P with (p + 1) % D == 0."""
    return sinks + (dilation - 1 - sinks) % dilation


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
    block_size: int = 128,
):
    """Causal attention under the (D, W, P) pattern: a query at q sees keys k <= q with q - k <= W, or
    k < P, or (k + 1) % D == 0. D = 1 is dense causal; D = -1 has no grid.

    Args:
        q: (B, H, Tq, K) at absolute positions ``q_offset .. q_offset + Tq - 1``.
        k, v: (B, H, Tk, K) at positions ``0 .. Tk - 1`` (Tk >= q_offset + Tq), or, with ``k_positions``
            (Tk,), a gathered set of keys at those global positions (context parallelism, chunked prefill).
            A query none of whose allowed keys is present gets a zero output and a log-sum-exp of -inf, so
            partial results over disjoint key sets merge exactly.
    Returns:
        out (B, H, Tq, K) in ``q.dtype``, and with ``return_lse`` the natural-log log-sum-exp of the scaled
        scores (B, H, Tq) in fp32.

    One exact softmax per block of queries over the concatenation of three disjoint key sets: sinks outside
    the window, grid keys outside the window, and the window itself, so memory per block is
    block · (P + Tk/D + block + W) instead of Tk².
    """
    tq, tk = q.shape[-2], k.shape[-2]
    if k_positions is not None:
        out, lse = _attend_positions(q, k, v, q_offset, k_positions, (dilation, window, sinks), scale, block_size)
        return (out, lse) if return_lse else out
    if tk < q_offset + tq:
        raise ValueError(f"sparse_attention: {tk} keys cannot cover queries up to position {q_offset + tq - 1}")
    if not (dilation >= 1 or dilation == -1) or window < 0 or sinks < 0:
        raise ValueError(f"sparse_attention: bad pattern D={dilation} W={window} P={sinks}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if dilation == 1 and q_offset == 0 and tq == tk and not return_lse:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    grid = _grid_positions(dilation, sinks, tk, k.device)
    outs, lses = [], []
    for start in range(0, tq, block_size):
        stop = min(start + block_size, tq)
        out, lse = _attend_block(q[..., start:stop, :], k, v, q_offset + start, (dilation, window, sinks), grid,
                                 scale)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=-2).to(q.dtype)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out


def _grid_positions(dilation: int, sinks: int, length: int, device) -> torch.Tensor:
    if dilation == -1:
        return torch.zeros(0, dtype=torch.long, device=device)
    start = grid_start(dilation, sinks)
    return torch.arange(start, max(start, length), dilation, device=device)


def _attend_block(q, k, v, first: int, pattern: Pattern, grid: torch.Tensor, scale: float):
    """Queries at positions first .. first + n - 1 against sinks, grid keys and their window."""
    _, window, sinks = pattern
    last = first + q.shape[-2] - 1
    qpos = torch.arange(first, last + 1, device=q.device)[:, None]
    lo = max(0, first - window)
    sink_pos = torch.arange(min(sinks, last + 1), device=q.device)
    grid_pos = grid[grid < last - window]
    local_pos = torch.arange(lo, last + 1, device=q.device)
    keys = torch.cat([k[..., :len(sink_pos), :], k[..., grid_pos, :], k[..., lo:last + 1, :]], dim=-2)
    values = torch.cat([v[..., :len(sink_pos), :], v[..., grid_pos, :], v[..., lo:last + 1, :]], dim=-2)
    # Sinks and grid keys count only outside the query's window, where the window part cannot see them.
    allowed = torch.cat([
        sink_pos[None, :] < qpos - window,
        grid_pos[None, :] < qpos - window,
        (local_pos[None, :] >= qpos - window) & (local_pos[None, :] <= qpos),
    ], dim=-1)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    return torch.matmul(probs, values.float()), lse


def _attend_positions(q, k, v, q_offset: int, k_positions: torch.Tensor, pattern: Pattern, scale, block_size: int):
    """Masked softmax over keys at arbitrary global positions, one block of queries at a time."""
    dilation, window, sinks = pattern
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kpos = k_positions.to(q.device)[None, :]
    outs, lses = [], []
    for start in range(0, q.shape[-2], block_size):
        qb = q[..., start:start + block_size, :]
        qpos = torch.arange(q_offset + start, q_offset + start + qb.shape[-2], device=q.device)[:, None]
        near = (qpos - kpos <= window) | (kpos < sinks)
        if dilation != -1:
            near = near | ((kpos + 1) % dilation == 0)
        allowed = (kpos <= qpos) & near
        scores = torch.matmul(qb.float(), k.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with no key: -inf - -inf
        outs.append(torch.matmul(probs, v.float()))
        lses.append(lse)
    return torch.cat(outs, dim=-2).to(q.dtype), torch.cat(lses, dim=-1)


def _head_index(heads: list[int]):
    """A slice for contiguous heads (a view, no copy), else the index list."""
    return slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads


def _by_head_groups(pattern: Pattern, num_heads: int, run, *tensors):
    """Run ``run(head_pattern, *tensors_of_those_heads)`` once per group of heads sharing a head pattern
    (tensors are (B, H, ...)), and put the (B, h, ...) results back in head order."""
    groups = head_groups(pattern, num_heads)
    if len(groups) == 1:
        return run(groups[0][0], *tensors)
    outs, order = [], []
    for head_pattern, heads in groups:
        index = _head_index(heads)
        outs.append(run(head_pattern, *(t[:, index] for t in tensors)))
        order += heads
    out = torch.cat(outs, dim=1)
    if order == sorted(order):
        return out
    return out[:, torch.argsort(torch.tensor(order, device=out.device))]


def attention(q, k, v, pattern: Pattern, scale: float | None = None, *, q_offset: int = 0,
              k_positions: torch.Tensor | None = None):
    """Training/prefill attention of q (B, H, Tq, K) at positions q_offset.. over k, v (B, H, Tk, K) at positions
    0 .. Tk - 1, or at ``k_positions`` (sorted) when the keys are a gathered set; the fused kernel on CUDA.

    ``pattern`` is a head pattern or one per head (spec §4.4): heads that share a pattern run in one call, so
    the kernel runs once per distinct head pattern. Top-k heads (§4.5) run ``topk_attention`` (the fused
    ``topk_attention_fused`` on CUDA)."""
    if is_per_head(pattern):
        return _by_head_groups(pattern, q.shape[1], lambda p, a, b, c: attention(
            a, b, c, p, scale, q_offset=q_offset, k_positions=k_positions), q, k, v)
    dilation, window, sinks = pattern[:3]
    if topk_of(pattern) and dilation != 1:
        if k_positions is not None:
            raise ValueError("top-k block attention needs the keys at positions 0 .. Tk - 1 (no k_positions)")
        block_attention = _fused("block_attention", q)
        if block_attention is not None:
            return topk_attention_fused(q, k, v, pattern, scale, q_offset=q_offset,
                                        kernels=(_fused("sparse_attention", q), block_attention))
        return topk_attention(q, k, v, pattern, scale, q_offset=q_offset)
    if dilation == 1 and k_positions is None and q_offset == 0 and q.shape[-2] == k.shape[-2]:
        # Dense causal attention over the whole sequence: torch's SDPA (flash attention on CUDA), not the fused
        # sparse kernel, until that is measured faster.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    fused = _fused("sparse_attention", q)
    if fused is not None:
        return fused(q, k, v, dilation, window, sinks, scale, q_offset=q_offset, k_positions=k_positions)
    return sparse_attention(q, k, v, dilation, window, sinks, scale, q_offset=q_offset, k_positions=k_positions)


# --------------------------------------------------------------------------------------------------------------
# Top-k block attention (spec §4.5)
# --------------------------------------------------------------------------------------------------------------


def block_summaries(k: torch.Tensor, block_size: int, score: str) -> torch.Tensor:
    """(B, H, n, K) per-channel max or mean of the keys of each complete block of ``block_size`` keys of
    k (B, H, T, K): n = T // block_size. Pooled in fp32, stored in the keys' dtype (as the cache stores them)."""
    n = k.shape[-2] // block_size
    blocks = k[..., :n * block_size, :].float().unflatten(-2, (n, block_size))
    pooled = blocks.amax(dim=-2) if score == "max" else blocks.mean(dim=-2)
    return pooled.to(k.dtype)


def select_block_ids(q: torch.Tensor, summaries: torch.Tensor, q_positions: torch.Tensor, pattern: Pattern):
    """Top-k block selection (spec §4.5): for queries q (B, H, n, K) at ``q_positions`` (n,), the (B, H, n, K)
    blocks each query sees among 0 .. nb (nb = summaries.shape[-2] complete blocks): the first block, the
    query's own block, and the K - 2 blocks among 1 .. own - 1 whose summary has the largest dot product with the
    query (fewer if fewer precede; the unused entries repeat the own block). Ties go to the lower block index."""
    k_blocks, block_size, _ = topk_of(pattern)
    nb = summaries.shape[-2]
    own = (q_positions // block_size).expand(*q.shape[:2], -1)  # (B, H, n)
    ids = [torch.zeros_like(own)[..., None], own[..., None]]
    picks = min(k_blocks - 2, max(nb - 1, 0))
    if picks > 0:
        block = torch.arange(nb, device=q.device)
        scores = torch.matmul(q.float(), summaries.float().transpose(-1, -2))  # (B, H, n, nb)
        candidate = (block >= 1) & (block < own[..., None])
        scores = scores.masked_fill(~candidate, float("-inf"))
        # Stable order: highest score first, the lower block on ties (sort is stable; topk need not be).
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :picks]
        ids.append(torch.where(torch.gather(candidate, -1, top), top, own[..., None]))
    ids = torch.cat(ids, dim=-1)
    if ids.shape[-1] < k_blocks:
        ids = torch.cat([ids, own[..., None].expand(*own.shape, k_blocks - ids.shape[-1])], dim=-1)
    return ids


def select_blocks(q: torch.Tensor, summaries: torch.Tensor, q_positions: torch.Tensor, pattern: Pattern):
    """``select_block_ids`` as a boolean (B, H, n, nb + 1): which of the blocks 0 .. nb each query sees."""
    ids = select_block_ids(q, summaries, q_positions, pattern)
    chosen = torch.zeros(*ids.shape[:-1], summaries.shape[-2] + 1, dtype=torch.bool, device=q.device)
    return chosen.scatter_(-1, ids, True)


def base_allowed(q_positions: torch.Tensor, k_positions: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The (D, W, P) rule of spec §1.3 as a (n_q, n_k) boolean, causality included."""
    dilation, window, sinks = pattern[:3]
    q, k = q_positions[:, None], k_positions[None, :]
    near = (q - k <= window) | (k < sinks)
    if dilation != -1:
        near = near | ((k + 1) % dilation == 0)
    return (k <= q) & near


def topk_attention(q, k, v, pattern: Pattern, scale: float | None = None, *, q_offset: int = 0,
                   return_lse: bool = False, block_queries: int = 128):
    """Top-k block attention (spec §4.5) of q (B, H, Tq, K) at positions q_offset.. over k, v (B, H, Tk, K) at
    0 .. Tk - 1: each query sees the keys of its (D, W, P) pattern and those of its selected blocks
    (``select_blocks``) that precede it, in one softmax. Blocks are scored with summaries of complete blocks
    only, so a query never selects by keys after it. Memory per block of queries: block_queries x Tk."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_size = topk_of(pattern)[1]
    tk = k.shape[-2]
    summaries = block_summaries(k, block_size, topk_of(pattern)[2])
    k_pos = torch.arange(tk, device=q.device)
    outs, lses = [], []
    for start in range(0, q.shape[-2], block_queries):
        qb = q[..., start:start + block_queries, :]
        q_pos = torch.arange(q_offset + start, q_offset + start + qb.shape[-2], device=q.device)
        chosen = select_blocks(qb, summaries, q_pos, pattern)  # (B, H, n, nb + 1)
        key_block = torch.clamp(k_pos // block_size, max=chosen.shape[-1] - 1)
        in_block = torch.gather(chosen, -1, key_block.expand(*chosen.shape[:-1], tk))
        allowed = base_allowed(q_pos, k_pos, pattern) | (in_block & (k_pos[None, :] <= q_pos[:, None]))
        scores = torch.matmul(qb.float(), k.float().transpose(-1, -2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse[..., None]), v.float()))
        lses.append(lse)
    out = torch.cat(outs, dim=-2).to(q.dtype)
    return (out, torch.cat(lses, dim=-1)) if return_lse else out


# Scores the fused route's selection holds at once (q · summaries, fp32): 128 MiB, whatever B·H and T.
SELECT_SCORES = 1 << 25


def topk_attention_fused(q, k, v, pattern: Pattern, scale: float | None = None, *, q_offset: int = 0,
                         return_lse: bool = False, kernels, select_queries: int | None = None):
    """``topk_attention`` through the fused kernels ``kernels = (sparse_attention, block_attention)``: the
    (D, W, P) keys in one call, the selected blocks' other keys in another, merged by their LSEs. The selection
    (``select_block_ids``, no gradient flows through it) runs in torch, ``select_queries`` queries at a time (by
    default as many as keep its scores within ``SELECT_SCORES`` floats)."""
    sparse_attention, block_attention = kernels
    dilation, window, sinks = pattern[:3]
    block_size, score = topk_of(pattern)[1:]
    with torch.no_grad():
        summaries = block_summaries(k, block_size, score)
        step = select_queries or max(1, SELECT_SCORES // (q.shape[0] * q.shape[1] * max(summaries.shape[-2], 1)))
        ids = torch.cat([select_block_ids(
            q[..., start:start + step, :], summaries,
            torch.arange(q_offset + start, q_offset + min(start + step, q.shape[-2]), device=q.device),
            pattern).to(torch.int32) for start in range(0, q.shape[-2], step)], dim=-2)
    out_fixed, lse_fixed = sparse_attention(q, k, v, dilation, window, sinks, scale, q_offset=q_offset,
                                            return_lse=True)
    # select_block_ids names blocks 0 .. own only, so the kernel's range check (a host sync) is skipped.
    out_blocks, lse_blocks = block_attention(q, k, v, ids, block_size, dilation, window, sinks, scale,
                                             q_offset=q_offset, return_lse=True, check_ids=False)
    out, lse = _MergeByLse.apply(out_fixed, lse_fixed, out_blocks, lse_blocks)
    return (out, lse) if return_lse else out


class _MergeByLse(torch.autograd.Function):
    """Two softmaxes over disjoint keys as one: ``lse = logaddexp(l1, l2)``, ``out = a·o1 + b·o2`` with
    ``a = exp(l1 - lse)``, ``b = exp(l2 - lse)``. Saves only its inputs (the kernels keep them for their own
    backward anyway) and recomputes the weights, so the merge adds no fp32 copies of the output to the graph.
    ``l1`` must be finite (the (D, W, P) part holds the query's own key); ``l2`` may be -inf."""

    @staticmethod
    def forward(ctx, o1, l1, o2, l2):
        ctx.save_for_backward(o1, l1, o2, l2)
        lse = torch.logaddexp(l1, l2)
        out = o1.float() * torch.exp(l1 - lse)[..., None] + o2.float() * torch.exp(l2 - lse)[..., None]
        return out.to(o1.dtype), lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        o1, l1, o2, l2 = ctx.saved_tensors
        lse = torch.logaddexp(l1, l2)
        a, b = torch.exp(l1 - lse), torch.exp(l2 - lse)
        o1f, o2f, g = o1.float(), o2.float(), d_out.float()
        out = o1f * a[..., None] + o2f * b[..., None]
        # d out / d l1 = a·(o1 - out) and d out / d l2 = b·(o2 - out); d lse / d l1 = a, d lse / d l2 = b.
        d_l1 = a * ((g * (o1f - out)).sum(-1) + d_lse)
        d_l2 = b * ((g * (o2f - out)).sum(-1) + d_lse)
        return (g * a[..., None]).to(o1.dtype), d_l1, (g * b[..., None]).to(o2.dtype), d_l2


# --------------------------------------------------------------------------------------------------------------
# Compressed decode cache (spec §4.2)
# --------------------------------------------------------------------------------------------------------------


class _HeadGroupCache:
    """The keys and values of the heads of one layer that share a head pattern, in one buffer of slots
    ``[sinks | ring | grid store]`` (spec §4.2): positions p < P in the sinks, later positions in a ring of W
    slots, a position leaving the ring moved to the grid store if (p + 1) % D == 0 (with W = 0, grid positions
    go there directly); a dense head keeps every position in its grid store. The slots filled so far are
    always a prefix of the buffer. A top-k head (spec §4.5) keeps every position at its own slot, plus one
    pooled key per complete block. Keys are stored after RoPE."""

    def __init__(self, pattern: Pattern, heads: list[int], *, batch_size: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device):
        self.pattern, self.heads, self.index = pattern, heads, _head_index(heads)
        self.dilation, self.base_window, self.base_sinks = pattern[:3]
        self.topk = topk_of(pattern) if self.dilation != 1 else None
        # A window or sink count beyond max_len is cut to what max_len positions fill (the same keys stay
        # visible: the ring then never wraps).
        self.sinks, self.window, grid = cache_regions(pattern, max_len)
        self.max_len = max_len
        self.kv = torch.zeros(2, batch_size, len(heads), self.sinks + self.window + grid, head_dim, dtype=dtype,
                              device=device)
        self.summary = (torch.zeros(batch_size, len(heads), summary_slots(pattern, max_len), head_dim, dtype=dtype,
                                    device=device) if self.topk else None)
        self.grid_len = 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.kv, self.summary) if t is not None]

    def filled(self, length: int) -> int:
        """Slots holding positions after ``length`` positions were stored (a prefix of the buffer)."""
        if self.topk:
            return length
        return min(length, self.sinks) + min(self.window, max(0, length - self.sinks)) + self.grid_len

    def _is_grid(self, position: int) -> bool:
        return self.dilation >= 1 and position >= self.sinks and (position + 1) % self.dilation == 0

    def _grid_append(self, kv: torch.Tensor) -> None:
        if self.grid_len >= self.kv.shape[-2] - self.sinks - self.window:
            raise ValueError(f"RAT+ decode cache is full ({self.max_len} positions); pass a larger max_cache_len")
        self.kv[..., self.sinks + self.window + self.grid_len, :] = kv
        self.grid_len += 1

    def attend(self, q: torch.Tensor, kv: torch.Tensor, t: int, scale: float | None) -> torch.Tensor:
        """Position t's attention: q (B, h, 1, K) over the cached keys and its own kv (2, B, h, 1, K)."""
        if self.topk:
            return self._attend_topk(q, kv, t, scale)
        n = self.filled(t)
        if n < self.kv.shape[-2]:
            # Slot n is not in use yet: the current key goes there for one fused call over sinks, ring, grid
            # and itself; ``append`` then stores it where it belongs.
            self.kv[..., n:n + 1, :] = kv
            return F.scaled_dot_product_attention(q, self.kv[0, :, :, :n + 1], self.kv[1, :, :, :n + 1], scale=scale)
        return F.scaled_dot_product_attention(q, torch.cat([self.kv[0, :, :, :n], kv[0]], dim=-2),
                                              torch.cat([self.kv[1, :, :, :n], kv[1]], dim=-2), scale=scale)

    def _attend_topk(self, q, kv, t: int, scale):
        """Position t's top-k attention (spec §4.5): the keys every row and head sees (its (D, W, P) keys, the
        first and the own block: one index list), then each row's and head's K - 2 selected blocks, gathered, with
        the keys already in the first list masked out (so every key counts once), then its own key; one SDPA
        call. The same selection rule as ``select_blocks`` (stable sort: ties to the lower block)."""
        blocks_k, block_size, _ = self.topk
        own = t // block_size
        fixed = _fixed_topk_positions(self.pattern, t, q.device)
        keys, values = [self.kv[0, :, :, fixed]], [self.kv[1, :, :, fixed]]
        mask = None
        picks = min(blocks_k - 2, own - 1)
        if picks > 0:
            scores = torch.matmul(q.float(), self.summary[:, :, 1:own].float().transpose(-1, -2))[:, :, 0]
            chosen = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :picks] + 1
            slots = (chosen[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(-2)
            dilation, window, sinks = self.pattern[:3]
            seen = (slots < sinks) | (t - slots <= window)
            if dilation != -1:
                seen = seen | ((slots + 1) % dilation == 0)
            index = slots[..., None].expand(*slots.shape, self.kv.shape[-1])
            keys.append(torch.gather(self.kv[0], 2, index))
            values.append(torch.gather(self.kv[1], 2, index))
            rows = (*slots.shape[:2], 1)
            mask = torch.cat([q.new_ones(*rows[:2], len(fixed), dtype=torch.bool), ~seen,
                              q.new_ones(rows, dtype=torch.bool)], dim=-1)[:, :, None, :]
        keys.append(kv[0])
        values.append(kv[1])
        return F.scaled_dot_product_attention(q, torch.cat(keys, dim=-2), torch.cat(values, dim=-2), attn_mask=mask,
                                              scale=scale)

    def append(self, kv: torch.Tensor, t: int) -> None:
        """Store position t (kv: (2, B, h, 1, K), after RoPE)."""
        kv = kv[..., 0, :]
        if self.topk:
            self.kv[..., t, :] = kv
            block_size = self.topk[1]
            if (t + 1) % block_size == 0 and (t + 1) // block_size <= self.summary.shape[-2]:
                self.summary[:, :, t // block_size] = block_summaries(
                    self.kv[0, :, :, t + 1 - block_size:t + 1], block_size, self.topk[2])[:, :, 0]
        elif t < self.sinks:
            self.kv[..., t, :] = kv
        elif self.window > 0:
            slot = self.sinks + (t - self.sinks) % self.window
            leaving = t - self.window
            if leaving >= self.sinks and self._is_grid(leaving):
                self._grid_append(self.kv[..., slot, :])
            self.kv[..., slot, :] = kv
        elif self._is_grid(t):
            self._grid_append(kv)

    def prefill(self, kv: torch.Tensor) -> None:
        """Store a whole prompt at once (kv: (2, B, h, T, K)); equivalent to ``append`` at every position."""
        n = kv.shape[-2]
        if self.topk:
            self.kv[..., :n, :] = kv
            summaries = block_summaries(kv[0], self.topk[1], self.topk[2])
            self.summary[:, :, :summaries.shape[-2]] = summaries
            return
        num_sinks = min(self.sinks, n)
        self.kv[..., :num_sinks, :] = kv[..., :num_sinks, :]
        if self.window > 0 and n > self.sinks:  # a prompt inside the sinks leaves the ring empty
            ring_pos = torch.arange(max(self.sinks, n - self.window), n, device=kv.device)
            self.kv[..., self.sinks + (ring_pos - self.sinks) % self.window, :] = kv[..., ring_pos, :]
        if self.dilation >= 1:
            grid_pos = _grid_positions(self.dilation, self.sinks, n - self.window, kv.device)
            if len(grid_pos) > self.kv.shape[-2] - self.sinks - self.window:
                raise ValueError("RAT+ decode cache is full; pass a larger max_cache_len")
            start = self.sinks + self.window
            self.kv[..., start:start + len(grid_pos), :] = kv[..., grid_pos, :]
            self.grid_len = len(grid_pos)

    def reorder(self, index: torch.Tensor) -> None:
        self.kv = self.kv.index_select(1, index)
        if self.summary is not None:
            self.summary = self.summary.index_select(0, index)


@functools.lru_cache(maxsize=16)
def _fixed_topk_positions(pattern: Pattern, t: int, device) -> torch.Tensor:
    """Positions < t that a top-k head's query at t sees whatever it selects: its (D, W, P) keys, the first
    block and its own block (once per step and pattern, shared by the layers)."""
    block_size = topk_of(pattern)[1]
    positions = torch.arange(t, device=device)
    base = base_allowed(torch.tensor([t], device=device), positions, pattern)[0]
    own_start = t // block_size * block_size
    return torch.nonzero(base | (positions < block_size) | (positions >= own_start)).flatten()


class RatPlusLayerCache:
    """One layer's decode cache: one ``_HeadGroupCache`` per distinct head pattern (heads with different
    patterns keep caches of different lengths, spec §4.4), and the recurrence state (before RoPE) in fp32."""

    def __init__(self, pattern: Pattern, *, batch_size: int, num_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device, recurrence: bool):
        self.pattern, self.max_len = pattern, max_len
        self.groups = [_HeadGroupCache(p, heads, batch_size=batch_size, head_dim=head_dim, max_len=max_len,
                                       dtype=dtype, device=device) for p, heads in head_groups(pattern, num_heads)]
        order = [h for g in self.groups for h in g.heads]  # heads in group order
        self.order = None if order == sorted(order) else sorted(range(num_heads), key=order.__getitem__)
        self.state = (torch.zeros(2, batch_size, num_heads, head_dim, dtype=torch.float32, device=device)
                      if recurrence else None)
        self.length = 0  # positions seen

    def tensors(self) -> list[torch.Tensor]:
        return [t for g in self.groups for t in g.tensors()] + ([self.state] if self.state is not None else [])

    def step(self, q: torch.Tensor, kv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Attend position ``length`` (q (B, H, 1, K), its kv (2, B, H, 1, K) after RoPE) to the cache and
        itself, then store it. Returns (B, H, 1, K)."""
        t = self.length
        if t >= self.max_len:
            raise ValueError(f"RAT+ decode cache is full ({self.max_len} positions); pass a larger max_cache_len")
        if len(self.groups) == 1:
            out = self.groups[0].attend(q, kv, t, scale)
            self.groups[0].append(kv, t)
        else:
            outs = []
            for g in self.groups:
                outs.append(g.attend(q[:, g.index], kv[:, :, g.index], t, scale))
                g.append(kv[:, :, g.index], t)
            out = torch.cat(outs, dim=1)
            if self.order is not None:
                out = out[:, self.order]
        self.length += 1
        return out

    def prefill(self, kv: torch.Tensor, state: torch.Tensor | None) -> None:
        """Store a whole prompt at once (kv: (2, B, H, T, K)); equivalent to ``step`` at every position."""
        n = kv.shape[-2]
        if self.length or n > self.max_len:
            raise ValueError(f"RAT+ decode cache: cannot prefill {n} tokens (holds {self.max_len}, has {self.length})")
        for g in self.groups:
            g.prefill(kv[:, :, g.index])
        if state is not None:
            self.state.copy_(state)
        self.length = n

    def reorder(self, index: torch.Tensor) -> None:
        for g in self.groups:
            g.reorder(index)
        if self.state is not None:
            self.state = self.state.index_select(1, index)


class RatPlusCache:
    """The per-layer compressed caches of one generation (all rows share one length: no padding)."""

    def __init__(self, layers: list[RatPlusLayerCache], attention_mode: str):
        self.layers = layers
        self.attention_mode = attention_mode

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


class RatPlusRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RatPlusMixer(nn.Module):
    """Temporal mixing: fused [o|q|k|v|g] projection → gated scan of k, v → RoPE → attention → output gate."""

    def __init__(self, config: RatPlusConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.head_dim, self.hidden_size = config.num_attention_heads, config.head_dim, d
        self.recurrence = config.apply_recurrence
        self.rope_theta = config.rope_theta
        self.pattern = config.layer_patterns()[layer_idx]
        self.in_proj = nn.Linear(d, (5 if self.recurrence else 4) * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, H*K) -> (B, H, T, K)
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _project(self, u: torch.Tensor):
        o, q, k, v, *g = self.in_proj(u).split(self.hidden_size, dim=-1)
        return o, self._heads(q), self._heads(k), self._heads(v), (self._heads(g[0]) if g else None)

    def _output(self, a: torch.Tensor, o: torch.Tensor) -> torch.Tensor:  # a: (B, H, T, K)
        return self.out_proj(a.transpose(1, 2).flatten(2) * torch.sigmoid(o))

    def forward(self, u, *, attention_mode: str = "sparse", cache: RatPlusLayerCache | None = None):
        """u: (B, T, d) normed input. With a cache holding earlier positions, decodes one position."""
        if cache is not None and cache.length:
            return self.step(u, cache)
        o, q, k, v, g = self._project(u)
        state = None
        if g is not None:
            k, v, state = recurrence(g, k, v)
        positions = torch.arange(u.shape[1], device=u.device)
        q, k = apply_rotary(q, positions, self.rope_theta), apply_rotary(k, positions, self.rope_theta)
        a = attention(q, k, v, DENSE if attention_mode == "dense" else self.pattern)
        if cache is not None:
            cache.prefill(torch.stack([k, v]), state)
        return self._output(a, o)

    def step(self, u: torch.Tensor, cache: RatPlusLayerCache) -> torch.Tensor:
        """Decode one position (u: (B, 1, d)) against the cache, then store it (spec §4.2)."""
        o, q, k, v, g = self._project(u)
        position = torch.tensor([cache.length], device=u.device)
        if g is not None:
            f = torch.sigmoid(g[:, :, 0].float())
            cache.state = f * cache.state + (1 - f) * torch.stack([k, v])[:, :, :, 0].float()
            k, v = (cache.state[i, :, :, None].to(k.dtype) for i in range(2))
        q, k = apply_rotary(q, position, self.rope_theta), apply_rotary(k, position, self.rope_theta)
        a = cache.step(q, torch.stack([k, v]))
        return self._output(a, o)


class RatPlusMLP(nn.Module):
    def __init__(self, config: RatPlusConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RatPlusBlock(nn.Module):
    def __init__(self, config: RatPlusConfig, layer_idx: int):
        super().__init__()
        self.input_norm = RatPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = RatPlusMixer(config, layer_idx)
        self.ffn_norm = RatPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = RatPlusMLP(config)

    def forward(self, x, *, attention_mode: str = "sparse", cache: RatPlusLayerCache | None = None):
        x = x + self.mixer(self.input_norm(x), attention_mode=attention_mode, cache=cache)
        return x + self.ffn(self.ffn_norm(x))


class RatPlusPreTrainedModel(PreTrainedModel):
    config_class = RatPlusConfig
    base_model_prefix = "model"
    _no_split_modules = ["RatPlusBlock"]
    _is_stateful = True  # generate() must not build a KV cache of its own: the model brings its compressed one

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        elif isinstance(module, RatPlusRMSNorm):
            module.weight.data.fill_(1.0)


class RatPlusModel(RatPlusPreTrainedModel):
    def __init__(self, config: RatPlusConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RatPlusBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RatPlusRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, *, attention_mode: str = "sparse", cache: RatPlusCache | None = None):
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_mode=attention_mode, cache=None if cache is None else cache.layers[i])
        return self.norm(x)


def _tied_keys():
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"lm_head.weight": "model.embed_tokens.weight"} if major >= 5 else ["lm_head.weight"]


class RatPlusForCausalLM(RatPlusPreTrainedModel, GenerationMixin):
    _tied_weights_keys = _tied_keys()

    def __init__(self, config: RatPlusConfig):
        super().__init__(config)
        self.model = RatPlusModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def layer_patterns(self, attention_mode: str = "sparse") -> list[Pattern]:
        _check_mode(attention_mode)
        n = self.config.num_hidden_layers
        return [DENSE] * n if attention_mode == "dense" else self.config.layer_patterns()

    def new_cache(self, batch_size: int, max_cache_len: int | None = None, attention_mode: str = "sparse"):
        """An empty compressed cache for ``batch_size`` sequences of up to ``max_cache_len`` tokens."""
        c, param = self.config, self.lm_head.weight
        max_len = max_cache_len or c.max_position_embeddings
        return RatPlusCache([
            RatPlusLayerCache(p, batch_size=batch_size, num_heads=c.num_attention_heads, head_dim=c.head_dim,
                              max_len=max_len, dtype=param.dtype, device=param.device, recurrence=c.apply_recurrence)
            for p in self.layer_patterns(attention_mode)
        ], attention_mode)

    def cache_nbytes(self, seq_len: int, batch_size: int = 1, attention_mode: str = "sparse") -> int:
        """Bytes ``new_cache(batch_size, seq_len)`` allocates; needs no weights (works on the meta device).
        Per layer: each head's key and value slots (its own pattern's geometry) and, for top-k heads, one
        pooled key per complete block, plus the fp32 recurrence state."""
        c = self.config
        kv_bytes = self.lm_head.weight.element_size()
        state = 2 * 4 * c.hidden_size if c.apply_recurrence else 0
        per_seq = 0
        for p in self.layer_patterns(attention_mode):
            slots, summaries = layer_cache_slots(p, c.num_attention_heads, seq_len)
            per_seq += kv_bytes * c.head_dim * (2 * slots + summaries) + state
        return batch_size * per_seq

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: RatPlusCache | None = None,
        use_cache: bool | None = None,
        attention_mode: str = "sparse",
        max_cache_len: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) in fp32; ``labels`` (B, T) give the next-token loss (shifted inside,
        ``-100`` ignored). ``attention_mode``: "sparse" runs the configured pattern, "dense" dense causal.
        ``use_cache`` returns the compressed cache in ``past_key_values``; with a cache that already holds
        positions, ``input_ids`` are the new tokens only."""
        _check_mode(attention_mode)
        _refuse_padding(attention_mask)
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(input_ids.shape[0], max_cache_len, attention_mode)
        if cache is not None and cache.attention_mode != attention_mode:
            raise ValueError(f"the cache was built for attention_mode={cache.attention_mode!r}, not {attention_mode!r}")
        if cache is not None and cache.seen_tokens:
            hidden = torch.cat([self.model(input_ids[:, i:i + 1], attention_mode=attention_mode, cache=cache)
                                for i in range(input_ids.shape[1])], dim=1)
        else:
            hidden = self.model(input_ids, attention_mode=attention_mode, cache=cache)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      **kwargs):
        if past_key_values is not None and past_key_values.seen_tokens:
            input_ids = input_ids[:, past_key_values.seen_tokens:]
        kwargs = {k: v for k, v in kwargs.items() if k in ("attention_mode", "max_cache_len")}
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache, **kwargs}


def _check_mode(attention_mode: str) -> None:
    if attention_mode not in ("sparse", "dense"):
        raise ValueError(f"attention_mode must be 'sparse' or 'dense', got {attention_mode!r}")


def _refuse_padding(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "RAT+ does not support padded batches: the recurrence never resets and positions are absolute, so "
            "padding would leak into every later token. Batch prompts of equal length or generate one at a time."
        )
