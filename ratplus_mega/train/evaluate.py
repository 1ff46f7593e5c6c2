"""Validation under dense attention and each named sparse pattern (never silently the configured one)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.distributed as dist

from ..batch import IGNORE_INDEX, Batch
from ..model.lm import RatPlusLM
from .runner import StepRunner

Pattern = tuple[int, int, int]


@contextlib.contextmanager
def patterns_set(model: RatPlusLM, patterns: list[Pattern]):
    """Run the model's 'sparse' attention under ``patterns`` (one per layer of the whole model)."""
    saved = {key: block.mixer.pattern for key, block in model.layers.items()}
    try:
        for key, block in model.layers.items():
            block.mixer.pattern = patterns[int(key)]
        yield
    finally:
        for key, block in model.layers.items():
            block.mixer.pattern = saved[key]


@torch.no_grad()
def evaluate(runner: StepRunner, model: RatPlusLM, batches: Iterable[Batch], patterns: list[Pattern]
             ) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``batches`` under ``patterns``, over all DP ranks."""
    ctx = runner.ctx
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss * tokens, tokens
    with patterns_set(model, patterns):
        for batch in batches:
            loss = runner.eval_loss(model, batch)
            if loss is not None:
                tokens = (batch["labels"] != IGNORE_INDEX).sum().to(ctx.device, torch.float64)
                total += torch.stack([loss.double() * tokens, tokens])
    model.train(was_training)
    total = runner.from_last_stage(total)
    if ctx.dp > 1:
        dist.all_reduce(total, group=ctx.dp_group)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(total[1].item())}
