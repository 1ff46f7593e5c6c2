"""One RAT+ block on megatron-core layers: norm → mixer → residual, norm → GELU FFN → residual.

Activations are megatron-style [T, B, d]; under sequence parallel the residual stream, the norms and the
residual adds hold [T/tp, B, d], and the column-parallel projections gather the sequence. The residual stream
keeps the model's ``residual_dtype`` (fp32 unless configured otherwise): the bf16 outputs of the mixer and the
FFN are added to it there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import tensor_parallel as mc_tp

from ..config.schema import ModelConfig
from ..parallel.context import ParallelContext
from . import glue
from .mixer import ParallelMixer, no_init


class _AllReduceGradOverTP(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the tensor-parallel group.

    Under sequence parallel each TP rank sees a different slice of the sequence, so the gradient of a
    replicated weight applied there (the norm gains) is a partial sum until reduced."""

    @staticmethod
    def forward(ctx, weight, group):
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ParallelRMSNorm(nn.Module):
    """RMSNorm with the reference model's arithmetic (fp32 statistics, the input's dtype before the gain),
    handing the matmuls the weights' dtype: bf16 under bf16 also when the residual stream is fp32."""

    def __init__(self, hidden_size: int, eps: float, ctx: ParallelContext):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ctx = ctx
        self.norm = glue.rms_norm  # or its compiled version (glue.compile_glue)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.ctx.sequence_parallel and self.training:
            weight = _AllReduceGradOverTP.apply(weight, self.ctx.tp_group)
        return self.norm(x, weight, self.eps)


class ParallelMLP(nn.Module):
    def __init__(self, m: ModelConfig, mp_config):
        super().__init__()
        self.fc1 = mc_tp.ColumnParallelLinear(m.hidden_size, m.ffn_hidden_size, config=mp_config, init_method=no_init,
                                              bias=False, gather_output=False)
        self.fc2 = mc_tp.RowParallelLinear(m.ffn_hidden_size, m.hidden_size, config=mp_config, init_method=no_init,
                                           bias=False, input_is_parallel=True, skip_bias_add=True)

    def forward(self, x):
        h, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(h))
        return out


class ParallelBlock(nn.Module):
    def __init__(self, m: ModelConfig, layer_idx: int, ctx: ParallelContext, mp_config):
        super().__init__()
        self.input_norm = ParallelRMSNorm(m.hidden_size, m.norm_eps, ctx)
        self.mixer = ParallelMixer(m, layer_idx, ctx, mp_config)
        self.ffn_norm = ParallelRMSNorm(m.hidden_size, m.norm_eps, ctx)
        self.ffn = ParallelMLP(m, mp_config)

    def forward(self, x: torch.Tensor, *, attention_mode: str = "sparse"):
        x = x + self.mixer(self.input_norm(x), attention_mode=attention_mode)
        return x + self.ffn(self.ffn_norm(x))
