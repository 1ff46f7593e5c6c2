"""One pass of forward and backward for the run's layout, chosen once: the DeepSpeed engine runs it, or
megatron-core's 1F1B schedule does across pipeline stages. The joint step, validation and the data feed ask
the runner and never the layout.

Who owns backward: the plain engine (``engine(...)``, ``engine.backward``, ``engine.step``) for data, tensor and
sequence parallel at ZeRO 0–3. Under pipeline parallel the schedule runs on ``engine.module`` (never on the
engine: megatron would then read DeepSpeed's config, and DeepSpeed's hooks would divide gradients by the
accumulation count a second time), with DeepSpeed's managed accumulation off; after the schedule the tied
embedding's two copies get their summed gradient and ``engine.step`` reduces over data parallel, clips and
updates.

bf16 under pipeline parallel (ZeRO-1, DeepSpeed's ``BF16_Optimizer``): stages hand on the residual stream in
its own dtype (the schedule's ``pipeline_dtype``), and since the schedule never calls ``engine.backward``, the
optimizer's hooks (``bf16.immediate_grad_update``) move each micro-batch's bf16 gradient into its fp32 buffer
as it arrives, so micro-batches accumulate in fp32; the tied-embedding sum then runs on those fp32 buffers
(docs/decisions.md, "bf16").
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..batch import Batch
from ..parallel.context import ParallelContext
from ..parallel.pipeline import finalize_tied_embedding, forward_backward, mark_tied_copy
from .feed import BroadcastFeed, DirectFeed


class StepRunner:
    """What the loop asks of a layout. ``feed`` says who reads batches (train/feed.py); ``deepspeed_config``
    holds the engine settings the layout needs."""

    ctx: ParallelContext
    feed: DirectFeed | BroadcastFeed
    deepspeed_config: dict = {}

    def prepare(self, model: torch.nn.Module) -> None:
        """Called before ``deepspeed.initialize``."""

    def check_engine(self, engine) -> None:
        """Called after ``deepspeed.initialize``: refuse an engine this runner would drive wrongly."""

    def train_pass(self, engine, micro_batches: list[Batch], attention_mode: str) -> torch.Tensor:
        """Accumulate gradients over ``micro_batches`` and step; the sum of their losses, on every rank."""
        raise NotImplementedError

    def eval_loss(self, model, batch: Batch) -> torch.Tensor | None:
        """The token-mean loss of ``batch`` where the model ends (None on other pipeline stages)."""
        raise NotImplementedError

    def from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` as the last pipeline stage holds it, on every stage."""
        return value


class EngineRunner(StepRunner):
    """Data, tensor and sequence parallel: the DeepSpeed engine runs forward and backward."""

    def __init__(self, ctx: ParallelContext):
        self.ctx, self.feed = ctx, DirectFeed(ctx)

    def train_pass(self, engine, micro_batches: list[Batch], attention_mode: str) -> torch.Tensor:
        total = torch.zeros((), device=self.ctx.device)
        for batch in micro_batches:
            batch = self._on_device(batch)
            loss = engine(batch["input_ids"], batch["labels"], attention_mode=attention_mode)
            engine.backward(loss)
            engine.step()  # steps the optimizer at the accumulation boundary only
            total += loss.detach().float()
        return total

    def eval_loss(self, model, batch: Batch) -> torch.Tensor | None:
        batch = self._on_device(batch)
        return model(batch["input_ids"], batch["labels"]).detach().float()

    def _on_device(self, batch: Batch) -> Batch:
        # The loader yields CPU tensors; DeepSpeed moves the model, never the inputs.
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}


class PipelineRunner(StepRunner):
    """Pipeline parallel: megatron-core's schedule runs forward and backward on ``engine.module``."""

    def __init__(self, ctx: ParallelContext, seq_len: int, precision: str = "fp32"):
        self.ctx, self.seq_len, self.feed = ctx, seq_len, BroadcastFeed(ctx)
        self.bf16 = precision == "bf16"

    @property
    def deepspeed_config(self) -> dict:
        # DeepSpeed overlaps gradient reduction without its managed accumulation only at ZeRO-2; PP runs ZeRO-1.
        config = {"managed_gradient_accumulation": False, "zero_optimization": {"overlap_comm": False}}
        if self.bf16:
            # The schedule calls backward itself: without these hooks the fp32 buffers are empty at the step.
            config["bf16"] = {"enabled": True, "immediate_grad_update": True}
        return config

    def prepare(self, model: torch.nn.Module) -> None:
        mark_tied_copy(model)
        model.config.pipeline_dtype = model.residual_dtype  # what stages send: the residual stream

    def check_engine(self, engine) -> None:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        if engine.bfloat16_enabled() != self.bf16:
            raise RuntimeError(f"the pipeline runner was built for {'bf16' if self.bf16 else 'fp32'} but the "
                               f"engine runs {'bf16' if engine.bfloat16_enabled() else 'fp32'}: pass the run's "
                               "train.precision to build_step_runner")
        if self.bf16 and not (isinstance(engine.optimizer, BF16_Optimizer) and engine.optimizer.immediate_grad_update):
            raise RuntimeError(f"bf16 under pipeline parallel needs DeepSpeed's BF16_Optimizer with "
                               f"immediate_grad_update (got {type(engine.optimizer).__name__}): megatron-core's "
                               "schedule never calls engine.backward, so nothing else fills its fp32 gradients")

    def train_pass(self, engine, micro_batches: list[Batch], attention_mode: str) -> torch.Tensor:
        losses = self._schedule(engine.module, micro_batches, attention_mode=attention_mode)
        finalize_tied_embedding(engine.module, gradient=_fp32_gradient(engine.optimizer) if self.bf16 else None)
        engine.step()
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=self.ctx.device)
        return self.from_last_stage(total.float())

    def eval_loss(self, model, batch: Batch) -> torch.Tensor | None:
        losses = self._schedule(model, [batch], forward_only=True)
        return losses[0].detach().float() if losses else None

    def from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.ctx.device)
        dist.broadcast(value, src=dist.get_global_rank(self.ctx.pp_group, self.ctx.pp - 1), group=self.ctx.pp_group)
        return value

    def _schedule(self, model, micro_batches: list[Batch], **kwargs) -> list[torch.Tensor]:
        # Batches arrive on this rank's device from the feed's broadcast.
        return forward_backward(model, micro_batches, num_microbatches=len(micro_batches), seq_len=self.seq_len,
                                micro_batch_size=micro_batches[0]["input_ids"].shape[0], **kwargs)


def _fp32_gradient(optimizer):
    """The fp32 buffer in which DeepSpeed's ``BF16_Optimizer`` accumulates a bf16 parameter's gradient (this
    rank's, before the data-parallel reduction at ``step``), found by the parameter's place in its groups."""
    def gradient(param: torch.Tensor) -> torch.Tensor:
        for group, buffers in zip(optimizer.bf16_groups, optimizer.fp32_groups_gradients):
            for p, buffer in zip(group, buffers):
                if p is param:
                    return buffer
        raise KeyError("the tied embedding is not among the optimizer's bf16 parameters")
    return gradient


def build_step_runner(ctx: ParallelContext, *, seq_len: int, precision: str = "fp32") -> StepRunner:
    """The runner for this layout and ``precision`` (``train.precision``; collective: the pipeline runner's
    feed forms the readers' group)."""
    return PipelineRunner(ctx, seq_len, precision) if ctx.pp > 1 else EngineRunner(ctx)
