"""One global batch: a step under the configured sparse pattern, then (joint training) a dense step on the
same micro-batches (docs/spec.md §2.2, "active recurrence learning").

Each pass accumulates the mean over micro-batches of each micro-batch's token-mean loss, is clipped and takes
its own optimizer step; the lr is set once before both. The step runner says how a pass runs on this layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist

from ..batch import Batch
from .engine import set_learning_rate
from .runner import StepRunner


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


def train_step(runner: StepRunner, engine, micro_batches: list[Batch], *, lr: float, joint: bool) -> StepResult:
    set_learning_rate(engine, lr)
    sparse = _run_pass(runner, engine, micro_batches, "sparse")
    dense = _run_pass(runner, engine, micro_batches, "dense") if joint else None
    return StepResult(sparse, dense)


def _run_pass(runner: StepRunner, engine, micro_batches: list[Batch], attention_mode: str) -> PassResult:
    total = runner.train_pass(engine, micro_batches, attention_mode)
    loss = (total / len(micro_batches)).reshape(1)
    if runner.ctx.dp > 1:
        dist.all_reduce(loss, group=runner.ctx.dp_group)
        loss /= runner.ctx.dp
    return PassResult(loss=loss.item(), grad_norm=_grad_norm(engine))


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan
