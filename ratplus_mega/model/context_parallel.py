"""Context parallelism for the RAT+ mixer: a sequence split over the CP ranks, each computing what its tokens
compute in the whole sequence (docs/parallelism.md, "Context parallel").

Chunks. The sequence of T tokens is cut into chunks; ``contiguous`` gives CP rank r the chunk r of CP chunks,
``zigzag`` gives it the chunks r and 2·CP − 1 − r of 2·CP (each rank then holds an early and a late piece, so
the causal dense pass costs every rank the same). RoPE and the grid rule use global positions.

The recurrence carry. Each chunk is scanned from a zero state. Its summary — the product of its gates and its
final state, fp32, O(B·H·K) per layer whatever T — is all-gathered (one collective forward, one backward);
each chunk folds the summaries of the chunks before it into its carry c and adds A_t · c to its scan, A_t the
product of its gates up to t. That is the whole-sequence scan exactly: h_t = A_t · c + (scan from zero)_t.
The carry's gradient reaches the earlier chunks' summaries through the gather's backward.

Attention across chunks. A chunk's keys that any later query may see under the layer's patterns — the sinks,
the grid keys, the last W keys (the window halo) — are all-gathered (all keys for the dense pass, where every
key is a grid key); each chunk attends to the gathered keys before it and to its own keys, with their global
positions, through the same attention function as one process (``k_positions``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..hf.cache_layout import head_patterns, topk_of
from . import ops

ORDERS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class SequenceChunks:
    """Which tokens of a ``seq_len``-token sequence CP rank ``rank`` of ``cp`` holds."""

    seq_len: int
    cp: int
    rank: int
    order: str = "zigzag"

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"context-parallel order must be one of {ORDERS}, got {self.order!r}")
        if self.seq_len % self.count:
            raise ValueError(f"a sequence of {self.seq_len} tokens does not split into {self.count} equal "
                             f"{self.order} chunks")

    @property
    def count(self) -> int:
        """Chunks in the whole sequence."""
        return self.cp * (2 if self.order == "zigzag" else 1)

    @property
    def length(self) -> int:
        """Tokens per chunk."""
        return self.seq_len // self.count

    def chunk_ids(self, rank: int | None = None) -> list[int]:
        """The global indices of the chunks ``rank`` (default: this rank) holds, in its local order."""
        rank = self.rank if rank is None else rank
        return [rank, self.count - 1 - rank] if self.order == "zigzag" else [rank]

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """This rank's chunks as global [start, stop) positions, in local order."""
        return [(c * self.length, (c + 1) * self.length) for c in self.chunk_ids()]

    @property
    def local_len(self) -> int:
        return self.length * len(self.spans)

    def positions(self, device=None) -> torch.Tensor:
        """Global positions of this rank's tokens, in local order."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.spans])

    def take(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor (time along ``dim``)."""
        if t.shape[dim] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} positions along dim {dim}, got {t.shape[dim]}")
        return torch.cat([t.narrow(dim, a, b - a) for a, b in self.spans], dim=dim)

    @classmethod
    def for_local(cls, local_len: int, cp: int, rank: int, order: str) -> "SequenceChunks":
        """The chunks of a rank that holds ``local_len`` tokens."""
        return cls(seq_len=local_len * cp, cp=cp, rank=rank, order=order)


class _AllGather(torch.autograd.Function):
    """(cp, *x.shape): every rank's ``x``; the backward hands each rank the sum of the gradients for its piece."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        size = dist.get_world_size(group)
        out = x.new_empty((size, *x.shape))
        if dist.get_backend(group) == "nccl":
            dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        else:  # gloo gathers into a list only
            dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty(grad.shape[1:])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad[rank], None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather along a new leading dimension."""
    return _AllGather.apply(x, group)


# ----------------------------------------------------------------------------------------------------------------
# The recurrence carry
# ----------------------------------------------------------------------------------------------------------------


def recurrence(g: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: SequenceChunks, group):
    """``ops.recurrence`` over the whole sequence for this rank's chunks: g, k, v (B, H, T_local, K) in local
    order; returns k̃, ṽ (the input dtype)."""
    k_parts, v_parts, gate_products, summaries = [], [], [], []
    for i in range(len(chunks.spans)):
        part = slice(i * chunks.length, (i + 1) * chunks.length)
        kc, vc, state = ops.recurrence(g[..., part, :], k[..., part, :], v[..., part, :])
        # Products of the gates from the chunk's start, in log space: no underflow trouble, a clean gradient.
        gate_product = torch.exp(torch.cumsum(F.logsigmoid(g[..., part, :].float()), dim=-2))  # (B, H, L, K)
        k_parts.append(kc)
        v_parts.append(vc)
        gate_products.append(gate_product)
        summaries.append(torch.cat([gate_product[..., -1, :][None], state]))  # (3, B, H, K): A_last, k, v states
    gathered = all_gather(torch.stack(summaries), group)  # (cp, chunks per rank, 3, B, H, K)
    by_chunk = {c: gathered[r, i] for r in range(chunks.cp) for i, c in enumerate(chunks.chunk_ids(r))}
    # Fold in sequence order: carry_c = A_{c-1} · carry_{c-1} + state_{c-1}. The first chunk's zero carry is
    # taken from the gathered tensor (times 0) so that the gather is in every rank's graph: each rank must join
    # its backward collective.
    carries = [by_chunk[0][1:] * 0]
    for c in range(chunks.count - 1):
        carries.append(by_chunk[c][0] * carries[-1] + by_chunk[c][1:])
    out_k, out_v = [], []
    for c, kc, vc, gate_product in zip(chunks.chunk_ids(), k_parts, v_parts, gate_products):
        out_k.append((kc.float() + gate_product * carries[c][0].unsqueeze(-2)).to(kc.dtype))
        out_v.append((vc.float() + gate_product * carries[c][1].unsqueeze(-2)).to(vc.dtype))
    return torch.cat(out_k, dim=-2), torch.cat(out_v, dim=-2)


# ----------------------------------------------------------------------------------------------------------------
# Attention across chunks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GatherPlan:
    """How a rank shares and reads the keys later chunks may see, for one chunk layout, set of head patterns and
    device: built on the host once and cached, so the forward asks the device nothing to lay out its gather."""

    width: int
    """Shared keys per chunk in the all-gather (every chunk padded to the widest)."""
    local_index: tuple[torch.Tensor, ...]
    """Per local chunk: where its shared keys lie in this rank's local sequence."""
    sources: tuple[tuple[int, int, int], ...]
    """Per chunk in sequence order: the rank holding it, its local index there, and how many keys it shares."""
    before: tuple[int, ...]
    """Per local chunk: how many shared keys the chunks before it hold."""
    key_positions: tuple[torch.Tensor, ...]
    """Per local chunk: the global positions of the keys it attends to (earlier shared keys, then its own)."""


@functools.lru_cache(maxsize=64)
def _gather_plan(chunks: SequenceChunks, patterns: tuple, device: torch.device) -> _GatherPlan:
    """A chunk shares the positions a query of a later chunk may attend to under any of ``patterns``: its sinks,
    its grid keys, its last W."""
    shared = []
    for c in range(chunks.count):
        start, stop = c * chunks.length, (c + 1) * chunks.length
        p = torch.arange(start, stop)
        keep = torch.zeros_like(p, dtype=torch.bool)
        for dilation, window, sinks in {pattern[:3] for pattern in patterns}:
            keep |= (p < sinks) | (p >= stop - window)
            if dilation != -1:
                keep |= (p + 1) % dilation == 0
        shared.append(p[keep])
    holder = {c: (r, i) for r in range(chunks.cp) for i, c in enumerate(chunks.chunk_ids(r))}
    mine = chunks.chunk_ids()
    before = tuple(sum(len(pos) for pos in shared[:c]) for c in mine)
    early = torch.cat(shared)
    return _GatherPlan(
        width=max(len(pos) for pos in shared),
        local_index=tuple((shared[c] - c * chunks.length + i * chunks.length).to(device) for i, c in enumerate(mine)),
        sources=tuple((*holder[c], len(pos)) for c, pos in enumerate(shared)),
        before=before,
        key_positions=tuple(torch.cat([early[:n], torch.arange(a, b)]).to(device)
                            for n, (a, b) in zip(before, chunks.spans)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, chunks: SequenceChunks, group):
    """``ops.attention`` over the whole sequence for this rank's queries: q, k, v (B, H, T_local, K) in local
    order, ``pattern`` a head pattern or one per head (spec §4.4); returns (B, H, T_local, K)."""
    patterns = head_patterns(pattern, q.shape[1])
    if any(topk_of(p) for p in patterns):
        raise ValueError("top-k block attention runs on whole sequences (inference and adaptation without "
                         "context parallelism)")
    plan = _gather_plan(chunks, tuple(sorted(set(patterns))), q.device)
    mine = [F.pad(torch.stack([k[..., index, :], v[..., index, :]]), (0, 0, 0, plan.width - len(index)))
            for index in plan.local_index]  # each (2, B, H, width, K)
    gathered = all_gather(torch.stack(mine), group)  # (cp, chunks per rank, 2, B, H, width, K)
    # Every chunk's shared keys in sequence order; a chunk attends to those of the chunks before it.
    early_kv = torch.cat([gathered[rank, i][..., :n, :] for rank, i, n in plan.sources], dim=-2)
    outs = []
    for i, (before, positions) in enumerate(zip(plan.before, plan.key_positions)):
        part = slice(i * chunks.length, (i + 1) * chunks.length)
        keys = torch.cat([early_kv[0, ..., :before, :], k[..., part, :]], dim=-2)
        values = torch.cat([early_kv[1, ..., :before, :], v[..., part, :]], dim=-2)
        outs.append(ops.attention(q[..., part, :], keys, values, pattern, q_offset=chunks.spans[i][0],
                                  k_positions=positions))
    return torch.cat(outs, dim=-2)


def token_mean_loss(loss_sum: torch.Tensor, count: torch.Tensor, group) -> torch.Tensor:
    """The token-mean loss over the whole sequence from this rank's ``loss_sum`` over ``count`` tokens: its value
    is the global mean (the same on every CP rank, what logs and validation read); its gradient is that of this
    rank's share ``loss_sum / global count``, so the CP ranks' gradients sum to the global mean's — DeepSpeed sums
    them over CP and averages over DP only."""
    total = count.detach().float().clone()
    dist.all_reduce(total, group=group)
    share = loss_sum / total.clamp(min=1)
    value = share.detach().clone()
    dist.all_reduce(value, group=group)
    return share + (value - share.detach())
