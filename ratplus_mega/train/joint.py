"""One global batch: a step under the configured sparse pattern, then (joint training) a dense step on the
same micro-batches (RATPLUS_SPEC.md §2.2, "active recurrence learning").

Each pass accumulates the mean over micro-batches of each micro-batch's token-mean loss, is clipped and takes
its own optimizer step; the lr is set once before both. Without pipeline parallel the engine runs forward and
backward; with it megatron-core's 1F1B schedule does, on ``engine.module``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel.context import ParallelContext
from ..parallel.pipeline import finalize_tied_embedding, forward_backward
from .engine import set_learning_rate


@dataclass
class PassResult:
    loss: float
    """Mean over micro-batches of the token-mean loss, averaged over data-parallel ranks."""
    grad_norm: float
    """Global gradient norm before clipping."""


@dataclass
class StepResult:
    sparse: PassResult
    """The pass under the model's configured pattern."""
    dense: PassResult | None
    """The joint-training dense pass (None when not joint)."""


def train_step(engine, micro_batches: list[dict[str, torch.Tensor]], *, lr: float, joint: bool,
               ctx: ParallelContext, seq_len: int) -> StepResult:
    set_learning_rate(engine, lr)
    sparse = _run_pass(engine, micro_batches, "sparse", ctx, seq_len)
    dense = _run_pass(engine, micro_batches, "dense", ctx, seq_len) if joint else None
    return StepResult(sparse, dense)


def _run_pass(engine, micro_batches, attention_mode: str, ctx: ParallelContext, seq_len: int) -> PassResult:
    if ctx.pp > 1:
        losses = forward_backward(engine.module, micro_batches, num_microbatches=len(micro_batches),
                                  seq_len=seq_len, micro_batch_size=micro_batches[0]["input_ids"].shape[0],
                                  attention_mode=attention_mode)
        finalize_tied_embedding(engine.module)
        engine.step()
        total = torch.stack(losses).sum() if losses else torch.zeros(())
    else:
        total = torch.zeros(())
        for batch in micro_batches:
            loss = engine(batch["input_ids"], batch["labels"], attention_mode=attention_mode)
            engine.backward(loss)
            engine.step()  # steps the optimizer at the accumulation boundary only
            total += loss.detach().float().cpu()
    return PassResult(loss=_average_loss(total / len(micro_batches), ctx), grad_norm=_grad_norm(engine))


def _average_loss(loss: torch.Tensor, ctx: ParallelContext) -> float:
    """The last pipeline stage's loss, averaged over data-parallel replicas, on every rank."""
    loss = loss.detach().float().reshape(1).to(ctx.device)
    if ctx.pp > 1:
        dist.broadcast(loss, src=dist.get_global_rank(ctx.pp_group, ctx.pp - 1), group=ctx.pp_group)
    if ctx.dp > 1:
        dist.all_reduce(loss, group=ctx.dp_group)
        loss /= ctx.dp
    return loss.item()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan
