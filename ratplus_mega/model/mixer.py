"""The RAT+ temporal mixer on megatron-core layers (docs/spec.md §1.2).

The fused input projection is column parallel and stored rank-major: TP rank r holds the rows
``[o_r | q_r | k_r | v_r | g_r]``, the same heads of all five slices, so the recurrence and the attention
are per head and need no communication. ``reference_layout.py`` states the cut.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
from megatron.core import tensor_parallel as mc_tp

from ..config.schema import ModelConfig
from ..parallel.context import ParallelContext
from ..reference_layout import local_pattern
from . import context_parallel as cp_ops
from . import glue
from . import ops


def no_init(_weight: torch.Tensor) -> None:
    """megatron-core wants an init method; weights are set layout-free by ``model/init.py`` instead."""


class ParallelMixer(nn.Module):
    def __init__(self, m: ModelConfig, layer_idx: int, ctx: ParallelContext, mp_config):
        super().__init__()
        self.heads = m.num_heads // ctx.tp  # heads on this TP rank
        self.head_dim = m.head_dim
        self.width = m.hidden_size // ctx.tp
        self.recurrence = m.apply_recurrence
        self.rope_theta = m.rope_theta
        self._split = (m.num_heads, ctx.tp, ctx.tp_rank)
        self.ctx = ctx
        self.rotate, self.output_gate = glue.rotate, glue.output_gate  # or compiled (glue.compile_glue)
        self.recompute_core = False
        """Recompute the core (recurrence, RoPE, attention) in backward instead of storing its activations."""
        self.pattern = m.layer_patterns()[layer_idx]
        self.in_proj = mc_tp.ColumnParallelLinear(m.hidden_size, m.fused_slices * m.hidden_size, config=mp_config,
                                                  init_method=no_init, bias=False, gather_output=False)
        self.out_proj = mc_tp.RowParallelLinear(m.hidden_size, m.hidden_size, config=mp_config, init_method=no_init,
                                                bias=False, input_is_parallel=True, skip_bias_add=True)

    @property
    def pattern(self) -> tuple:
        """The layer's pattern over all heads (docs/spec.md §4.4); setting it also sets ``local_pattern``, the
        pattern of this rank's heads, which is what the forward runs."""
        return self._pattern

    @pattern.setter
    def pattern(self, value: tuple) -> None:
        self._pattern = value
        self.local_pattern = local_pattern(value, *self._split)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [T, B, H*K] -> (B, H, T, K)
        return t.unflatten(-1, (self.heads, self.head_dim)).permute(1, 2, 0, 3)

    def forward(self, u: torch.Tensor, *, attention_mode: str = "sparse") -> torch.Tensor:
        """u: normed input [T, B, d] ([T/tp, B, d] under sequence parallel); returns the same shape.

        Under context parallelism T is this rank's share of the sequence (``context_parallel.SequenceChunks``):
        the recurrence carries the earlier chunks' state in, the attention sees the earlier chunks' keys its
        pattern allows, and RoPE and the grid rule use global positions."""
        z, _ = self.in_proj(u)  # [T, B, slices * width]
        o, q, k, v, *g = z.split(self.width, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        pattern = ops.DENSE if attention_mode == "dense" else self.local_pattern
        gate = self._heads(g[0]) if g else None
        if self.recompute_core and torch.is_grad_enabled():
            a = torch.utils.checkpoint.checkpoint(self._core, q, k, v, gate, pattern, use_reentrant=False)
        else:
            a = self._core(q, k, v, gate, pattern)
        out, _ = self.out_proj(self.output_gate(a, o))
        return out

    def _core(self, q, k, v, gate, pattern) -> torch.Tensor:
        """The recurrence over k and v, RoPE and attention under ``pattern``: (B, H, T, K)."""
        if self.ctx.cp > 1:
            return self._core_context_parallel(q, k, v, gate, pattern)
        if self.recurrence:
            k, v, _ = ops.recurrence(gate, k, v)
        q, k = self.rotate(q, k, torch.arange(q.shape[-2], device=q.device), self.rope_theta)
        return ops.attention(q, k, v, pattern)

    def _core_context_parallel(self, q, k, v, gate, pattern) -> torch.Tensor:
        chunks = cp_ops.SequenceChunks.for_local(q.shape[-2], self.ctx.cp, self.ctx.cp_rank, self.ctx.cp_order)
        if self.recurrence:
            k, v = cp_ops.recurrence(gate, k, v, chunks, self.ctx.cp_group)
        q, k = self.rotate(q, k, chunks.positions(q.device), self.rope_theta)
        return cp_ops.attention(q, k, v, pattern, chunks, self.ctx.cp_group)
