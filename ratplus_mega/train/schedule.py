"""Learning-rate schedule of docs/spec.md §2.4, computed client-side once per global batch.

DeepSpeed steps a scheduler handed to it at every optimizer step — twice per batch in joint training — and
its ``WarmupCosineLR`` has another warmup shape and floor, so the driver sets the lr itself before each step.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """``floor(warmup_fraction * total_steps)`` (spec: 5 % of the global batches)."""
    return int(warmup_fraction * total_steps)


def learning_rate(step: int, *, total_steps: int, peak: float, floor: float, warmup: int) -> float:
    """The lr of 0-based global batch ``step``: linear warmup ``(step + 1) / warmup * peak`` for ``warmup``
    steps, then cosine from ``peak`` at ``step = warmup`` down to ``floor`` at ``step = total_steps``."""
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} is outside the schedule's {total_steps} steps")
    if step < warmup:
        return (step + 1) / warmup * peak
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2
