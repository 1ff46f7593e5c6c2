"""Throughput, MFU and logging (console line per log step, TensorBoard scalars on rank 0).

MFU counts the FLOPs of docs/flops.md: 3x the forward FLOPs per token; in joint training the sparse pass at
its sparse attention FLOPs plus the dense pass at dense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..accounting import DENSE, flops_per_token
from ..config.schema import ModelConfig

# Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "GH200": 989.0}


def device_peak_tflops() -> float | None:
    """The bf16 peak of the current CUDA device, or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def training_flops_per_token(m: ModelConfig, *, joint: bool) -> float:
    """FLOPs one global batch spends per token: the configured-pattern pass, plus the dense pass if joint."""
    flops = 3 * flops_per_token(m, m.layer_patterns())
    if joint:
        flops += 3 * flops_per_token(m, [DENSE] * m.num_layers)
    return flops


@dataclass
class Throughput:
    tokens_per_step: int
    flops_per_token: float
    world_size: int
    peak_tflops: float | None
    total_steps: int
    _last: float = field(default_factory=time.perf_counter)

    def step_done(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        tokens_per_s = self.tokens_per_step / max(seconds, 1e-9)
        out = {"step_time_s": seconds, "tokens_per_s": tokens_per_s,
               "eta_s": seconds * (self.total_steps - step - 1)}
        if self.peak_tflops:
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.world_size * self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


class Logger:
    """Console lines everywhere it is asked (rank 0 only by the caller) and TensorBoard scalars."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
