"""Validation under dense attention and each named sparse pattern (never silently the configured one)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.distributed as dist

from ..model.lm import IGNORE_INDEX, RatPlusLM
from ..parallel.context import ParallelContext
from ..parallel.pipeline import forward_backward

Pattern = tuple[int, int, int]


def pattern_name(patterns: list[Pattern]) -> str:
    """'dense', 'D16-W256-P4', or a per-layer list of such names."""
    names = ["dense" if d == 1 else f"D{d}-W{w}-P{p}" for d, w, p in patterns]
    return names[0] if len(set(names)) == 1 else "per-layer:" + ",".join(names)


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
def evaluate(model: RatPlusLM, batches: Iterable[dict[str, torch.Tensor]], patterns: list[Pattern],
             ctx: ParallelContext, *, seq_len: int) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``batches`` under ``patterns``, over all DP ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # loss * tokens, tokens
    with patterns_set(model, patterns):
        for batch in batches:
            tokens = (batch["labels"] != IGNORE_INDEX).sum().item()
            if ctx.pp > 1:
                losses = forward_backward(model, [batch], num_microbatches=1, seq_len=seq_len,
                                          micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
                loss = losses[0].item() if losses else 0.0
            else:
                loss = model(batch["input_ids"], batch["labels"]).item()
            if model.post_process:
                total += torch.tensor([loss * tokens, tokens], dtype=torch.float64)
    model.train(was_training)
    total = total.to(ctx.device)
    if ctx.pp > 1:
        dist.broadcast(total, src=dist.get_global_rank(ctx.pp_group, ctx.pp - 1), group=ctx.pp_group)
    if ctx.dp > 1:
        dist.all_reduce(total, group=ctx.dp_group)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(total[1].item())}
