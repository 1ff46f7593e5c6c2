"""DeepSpeed engine set-up for a run: config, optimizer groups, precision, activation checkpointing.

The lr schedule is ours (no DeepSpeed scheduler); fp32 master weights, optimizer state, gradient
accumulation and (by default) gradient reduction with bf16 compute on GPU, plain fp32 on CPU; the step runner
adds what its layout needs.
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint

from ..config.schema import RunConfig
from ..model import glue
from ..model.block import ParallelBlock, ParallelRMSNorm
from ..model.lm import RatPlusLM
from ..model.mixer import ParallelMixer
from ..parallel.context import ParallelContext
from .runner import StepRunner


def gradient_accumulation_steps(cfg: RunConfig, ctx: ParallelContext) -> int:
    """Micro-batches per rank and global batch; raises if the batch sizes do not divide."""
    t = cfg.train
    per_step = t.micro_batch_size * ctx.dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size}) x data-parallel ranks ({ctx.dp}) = {per_step}"
        )
    return t.global_batch_size // per_step


def deepspeed_config(cfg: RunConfig, ctx: ParallelContext, runner: StepRunner) -> dict:
    t, p = cfg.train, cfg.parallel
    accum = gradient_accumulation_steps(cfg, ctx)
    bf16 = t.precision == "bf16"
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * ctx.dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage, "overlap_comm": p.zero_overlap_comm,
                              "contiguous_gradients": p.zero_contiguous_gradients,
                              "reduce_bucket_size": p.zero_bucket_elements,
                              "allgather_bucket_size": p.zero_bucket_elements},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay,
            "torch_adam": True,  # torch's AdamW: no DeepSpeed op build, same math
        }},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        # DeepSpeed reduces in the weights' dtype unless told otherwise (docs/decisions.md, "bf16").
        config["communication_data_type"] = t.grad_reduce_dtype
        if ctx.cp > 1:  # DeepSpeed then reduces in this dtype instead
            config["seq_parallel_communication_data_type"] = t.grad_reduce_dtype
    for key, value in runner.deepspeed_config.items():  # the runner's settings win, section by section
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def parameter_groups(model: RatPlusLM, decay_all: bool, weight_decay: float) -> list[dict]:
    """One group decaying everything (the reference's recipe), or norm gains exempt."""
    if decay_all:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def apply_recompute(model: RatPlusLM, mode: str) -> None:
    """``train.recompute``: ``full`` recomputes each block in backward (only its input stored), ``selective``
    each mixer's core (recurrence, RoPE, attention); no dropout, so there is no RNG to replay."""
    for block in model.modules():
        if not isinstance(block, ParallelBlock):
            continue
        if mode == "full":
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
        block.mixer.recompute_core = mode == "selective"


def apply_compile_glue(model: RatPlusLM) -> None:
    """``train.compile_glue``: every norm and mixer of ``model`` runs the compiled elementwise glue
    (``model/glue.py``: RMSNorm, RoPE, the output gate)."""
    for module in model.modules():
        if isinstance(module, ParallelRMSNorm):
            module.norm = glue.compiled(glue.rms_norm)
        elif isinstance(module, ParallelMixer):
            module.rotate, module.output_gate = glue.compiled(glue.rotate), glue.compiled(glue.output_gate)


def build_engine(cfg: RunConfig, ctx: ParallelContext, model: RatPlusLM, runner: StepRunner):
    """Wrap ``model`` in a DeepSpeed engine with the run's optimizer and precision, for ``runner``'s layout."""
    import deepspeed

    from ..parallel.deepspeed_mpu import DeepSpeedMpu

    if cfg.train.precision == "bf16" and cfg.train.residual_dtype == "bf16":
        model.residual_dtype = torch.bfloat16
    runner.prepare(model)
    apply_recompute(model, cfg.train.recompute)
    if cfg.train.compile_glue:
        apply_compile_glue(model)
    model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    groups = parameter_groups(model, cfg.train.decay_all_parameters, cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=deepspeed_config(cfg, ctx, runner),
                                      mpu=DeepSpeedMpu(ctx))
    runner.check_engine(engine)
    return engine


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
