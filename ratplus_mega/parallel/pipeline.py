"""Pipeline parallel: megatron-core's 1F1B schedule over our stage modules, and the tied-embedding finalize.

DeepSpeed steps the optimizer; megatron-core owns forward and backward across stages (docs/parallelism.md,
"Who owns backward"; ``train/runner.py`` drives it). The schedule runs on ``engine.module``, never on the
engine: through the engine megatron would read DeepSpeed's config and DeepSpeed's hooks would divide gradients
by the accumulation count a second time. After the schedule, :func:`finalize_tied_embedding` makes the first
stage's embedding gradient and the last stage's head-copy gradient both equal their sum, so the two copies stay
bitwise equal after every step.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch
import torch.distributed as dist


def forward_backward(model: torch.nn.Module, micro_batches: Iterable[dict[str, torch.Tensor]], *, num_microbatches: int,
                     seq_len: int, micro_batch_size: int, attention_mode: str = "sparse",
                     forward_only: bool = False) -> list[torch.Tensor]:
    """Run the pipeline schedule over ``num_microbatches`` batches of ``input_ids``/``labels`` (B, T).

    Gradients accumulate in ``param.grad`` as the mean over micro-batches of each micro-batch's token-mean
    loss. Returns those per-micro-batch losses on the last stage (an empty list elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, stage):
        batch = next(data_iterator)
        output = stage(batch["input_ids"] if stage.pre_process else None,
                       batch["labels"] if stage.post_process else None, attention_mode=attention_mode)
        return output, functools.partial(_report_loss, cp=stage.ctx.cp)

    results = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro_batches), model=[model], num_microbatches=num_microbatches,
        seq_length=seq_len, micro_batch_size=micro_batch_size, forward_only=forward_only,
    )
    return [r["loss"] for r in results] if model.post_process else []


def _report_loss(loss: torch.Tensor, *, cp: int):
    # Two outputs: the schedule divides the loss by the number of micro-batches before backward, and multiplies
    # it by the context-parallel size (megatron averages gradients over DP x CP; DeepSpeed sums them over CP and
    # averages over DP, which the loss's gradient already accounts for: model/context_parallel.py).
    return loss / cp, {"loss": loss.detach().clone()}


def finalize_tied_embedding(model: torch.nn.Module,
                            gradient: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Sum the tied embedding's gradients over the first and last stage (no-op with one stage).

    ``gradient(weight)`` is the tensor this rank accumulated the weight's gradient in, summed in place; by
    default ``weight.grad`` (zeros when the weight got none). Under bf16 it is the optimizer's fp32 buffer."""
    ctx = model.ctx
    if ctx.pp == 1 or not (model.pre_process or model.post_process):
        return
    weight = model.embedding.weight if model.pre_process else model.output_weight
    if gradient is not None:
        grad = gradient(weight)
    else:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
    dist.all_reduce(grad, group=ctx.embedding_group)


def mark_tied_copy(model: torch.nn.Module) -> None:
    """Tell DeepSpeed the last stage's head copy duplicates the embedding, so the gradient norm counts it
    once (``ds_pipe_replicated``). Call before ``deepspeed.initialize``."""
    if model.post_process and not model.pre_process:
        model.output_weight.ds_pipe_replicated = True
