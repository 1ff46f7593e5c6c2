"""The RAT+ language model for training: vocab-parallel embedding, a stage's blocks, norm, tied head, loss.

One class serves every layout. A pipeline stage holds the blocks ``[first_layer, first_layer + n)``; the
first stage owns the embedding (pre-process), the last the final norm, head and loss (post-process). With
more than one stage the last holds a copy of the embedding for the tied head (``output_weight``), kept equal
to the first stage's by summing their gradients (``parallel/pipeline.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
from megatron.core import tensor_parallel as mc_tp
from megatron.core.enums import ModelType

from ..batch import IGNORE_INDEX
from ..config.schema import ModelConfig
from ..parallel.context import ParallelContext
from ..reference_layout import padded_vocab_size
from . import context_parallel as cp_ops
from .block import ParallelBlock, ParallelRMSNorm
from .mixer import no_init


class RatPlusLM(nn.Module):
    def __init__(self, m: ModelConfig, ctx: ParallelContext, *, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if m.num_layers % ctx.pp or m.num_heads % ctx.tp:
            raise ValueError(f"{m.num_layers} layers / {m.num_heads} heads do not split over PP={ctx.pp}, TP={ctx.tp}")
        self.model_config, self.ctx = m, ctx
        self.config = ctx.megatron_config(m.hidden_size, params_dtype)  # read by megatron-core's schedules
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = ctx.is_first_stage, ctx.is_last_stage
        per_stage = m.num_layers // ctx.pp
        self.first_layer = ctx.pp_rank * per_stage
        self.vocab_size, self.padded_vocab = m.vocab_size, padded_vocab_size(m.vocab_size, ctx.tp)
        if self.pre_process:
            self.embedding = mc_tp.VocabParallelEmbedding(self.padded_vocab, m.hidden_size, init_method=no_init,
                                                          reduce_scatter_embeddings=ctx.sequence_parallel,
                                                          config=self.config)
        self.layers = nn.ModuleDict({str(i): ParallelBlock(m, i, ctx, self.config)
                                     for i in range(self.first_layer, self.first_layer + per_stage)})
        if self.post_process:
            self.final_norm = ParallelRMSNorm(m.hidden_size, m.norm_eps, ctx)
            self.output_layer = mc_tp.ColumnParallelLinear(m.hidden_size, self.padded_vocab, config=self.config,
                                                           init_method=no_init, bias=False, gather_output=False,
                                                           skip_weight_param_allocation=True)
            if not self.pre_process:
                self.output_weight = nn.Parameter(torch.empty(self.padded_vocab // ctx.tp, m.hidden_size,
                                                              dtype=params_dtype))
        self.input_tensor = None
        self.loss_chunk_tokens = 0
        """Positions per chunk of the output layer and loss (``train.loss_chunk_tokens``; 0: all at once)."""
        self.residual_dtype = torch.float32
        """The residual stream's dtype, also what a stage hands the next (``train.residual_dtype``, set by the
        engine set-up; fp32 keeps it as the reference's autocast does when DeepSpeed runs the weights in bf16)."""

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron-core's pipeline schedules with the previous stage's output."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def head_weight(self) -> torch.Tensor:
        return self.embedding.weight if self.pre_process else self.output_weight

    def forward(self, input_ids: torch.Tensor | None, labels: torch.Tensor | None = None, *,
                attention_mode: str = "sparse"):
        """input_ids, labels: (B, T), ``labels[b, t]`` the target of position t (``-100`` ignored).

        First stages read ``input_ids``, later ones the hidden state handed over by ``set_input_tensor``.
        Returns, on the last stage, the token-mean loss when ``labels`` are given, else this TP rank's
        vocabulary slice of the logits (B, T, V/tp) in fp32; on other stages the hidden state [T, B, d].

        Under context parallelism every CP rank is given the whole sequence and keeps its own chunks
        (``context_parallel.SequenceChunks``): logits and hidden states are this rank's T/cp positions, in its
        local order; the loss is the token mean over the whole sequence (``context_parallel.token_mean_loss``).
        """
        if attention_mode not in ("sparse", "dense"):
            raise ValueError(f"attention_mode must be 'sparse' or 'dense', got {attention_mode!r}")
        if self.ctx.cp > 1:
            input_ids, labels = (None if t is None else self._chunks(t.shape[1]).take(t) for t in (input_ids, labels))
        if self.pre_process:
            x = self.embedding(input_ids).to(self.residual_dtype)  # [T/tp, B, d] under SP, else [B, T, d]
            x = x if self.ctx.sequence_parallel else x.transpose(0, 1).contiguous()
        else:
            x = self.input_tensor
        for layer in self.layers.values():
            x = layer(x, attention_mode=attention_mode)
        if not self.post_process:
            return x.contiguous()  # gloo refuses non-contiguous sends
        h = self.final_norm(x)
        if labels is None:
            return self._logits(h).transpose(0, 1)
        loss_sum, count = self._loss_sum(h, labels.transpose(0, 1))
        if self.ctx.cp > 1:
            return cp_ops.token_mean_loss(loss_sum, count, self.ctx.cp_group)
        return loss_sum / count.clamp(min=1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """[T, B, V/tp] fp32 logits of the final hidden state h ([T/tp, B, d] under SP: the layer gathers it)."""
        logits, _ = self.output_layer(h, weight=self.head_weight())
        return self._mask_padded_vocab(logits.float())

    def _loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and token count of h against labels [T, B], over chunks of ``loss_chunk_tokens`` positions
        when set: each chunk's logits are made, reduced to its loss and dropped, and made again in backward."""
        local, chunk = h.shape[0], self.loss_chunk_tokens
        if not chunk or chunk >= local:
            return vocab_parallel_loss_sum(self._logits(h), labels)
        # Under SP the layer gathers each chunk from every TP rank: rank r's row i is position r * local + i.
        tp = self.ctx.tp if self.ctx.sequence_parallel else 1
        rows = torch.arange(tp, device=labels.device)[:, None] * local + torch.arange(local, device=labels.device)
        total = count = 0
        for start in range(0, local, chunk):
            part = (h[start:start + chunk], labels[rows[:, start:start + chunk].flatten()])
            if torch.is_grad_enabled():
                loss_sum, n = torch.utils.checkpoint.checkpoint(self._chunk_loss_sum, *part, use_reentrant=False)
            else:
                loss_sum, n = self._chunk_loss_sum(*part)
            total, count = total + loss_sum, count + n
        return total, count

    def _chunk_loss_sum(self, h: torch.Tensor, labels: torch.Tensor):
        return vocab_parallel_loss_sum(self._logits(h), labels)

    def _chunks(self, seq_len: int) -> cp_ops.SequenceChunks:
        return cp_ops.SequenceChunks(seq_len, self.ctx.cp, self.ctx.cp_rank, self.ctx.cp_order)

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        if self.padded_vocab == self.vocab_size:
            return logits
        per_rank = self.padded_vocab // self.ctx.tp
        column = torch.arange(per_rank, device=logits.device) + self.ctx.tp_rank * per_rank
        return logits.masked_fill(column >= self.vocab_size, float("-inf"))


def vocab_parallel_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy over vocabulary-parallel logits [T, B, V/tp] and the number of tokens it sums;
    ``-100`` labels are ignored.

    megatron-core's ``vocab_parallel_cross_entropy`` has no ignore index: ignored targets are mapped to id 0
    and masked out of the sum."""
    keep = labels != IGNORE_INDEX
    per_token = mc_tp.vocab_parallel_cross_entropy(logits, labels.masked_fill(~keep, 0))
    return (per_token * keep).sum(), keep.sum()
