"""Metrics as data: every log step, validation and checkpoint save appends one record to
``OUT_DIR/metrics.jsonl``; the TensorBoard scalars and the console lines are views of the same records.

A record is a flat JSON object: ``kind`` (``train``, ``val`` or ``checkpoint``), ``step`` (global batches
done), ``tokens`` (training tokens consumed), and scalars named as their TensorBoard tags, each loss under its
pattern's name: ``train/loss_D64-W0-P0``, ``train/loss_dense``, ``train/grad_norm_D64-W0-P0``, ``train/lr``,
``perf/tokens_per_s``, ``perf/mfu``, ``val/loss_dense``, ``val/ppl_D16-W256-P4``, ``ckpt/save_s`` (seconds of
the collective save, commit included), ``ckpt/bytes`` (every file of the committed checkpoint), …

MFU counts the FLOPs of docs/flops.md: 3x the forward FLOPs per token; in joint training the sparse pass at
its sparse attention FLOPs plus the dense pass at dense.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..accounting import DENSE, flops_per_token
from ..config.schema import ModelConfig

METRICS_FILE = "metrics.jsonl"

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
    """Speed over the training steps since the last measurement (validation and saving excluded: call
    :meth:`restart` after them)."""

    tokens_per_step: int
    flops_per_token: float
    world_size: int
    peak_tflops: float | None
    total_steps: int
    start_step: int
    clock: Callable[[], float] = time.perf_counter
    _last_time: float = field(init=False)
    _last_step: int = field(init=False)

    def __post_init__(self):
        self.restart(self.start_step)

    def restart(self, step: int) -> None:
        """Start the next interval at ``step`` steps done, now."""
        self._last_time, self._last_step = self.clock(), step

    def measure(self, step: int) -> dict[str, float]:
        """Speed over the steps from the last restart or measurement to ``step`` steps done."""
        now = self.clock()
        steps, seconds = step - self._last_step, max(now - self._last_time, 1e-9)
        self.restart(step)
        tokens_per_s = self.tokens_per_step * steps / seconds
        step_time = seconds / max(steps, 1)
        out = {"perf/step_time_s": step_time, "perf/tokens_per_s": tokens_per_s,
               "perf/eta_s": step_time * (self.total_steps - step)}
        if self.peak_tflops:
            out["perf/mfu"] = tokens_per_s * self.flops_per_token / (self.world_size * self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


class MetricsLog:
    """Writes records on rank 0 (``out_dir`` given) and does nothing elsewhere (``out_dir`` None).

    Resuming at ``resume_step`` drops the records past it (steps logged after the checkpoint and then redone),
    so the file holds each step once; a run from step 0 starts a new file."""

    def __init__(self, out_dir: Path | None, *, resume_step: int, total_steps: int):
        self.total_steps, self.file, self.writer = total_steps, None, None
        if out_dir is None:
            return
        path = Path(out_dir) / METRICS_FILE
        kept = [r for r in read_metrics(out_dir) if r["step"] <= resume_step] if resume_step else []
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if "/" in name:
                self.writer.add_scalar(name, value, record["step"])
        self.writer.flush()
        print(self._console_line(record), flush=True)

    def _console_line(self, r: dict) -> str:
        if r["kind"] == "checkpoint":
            gb, seconds = r["ckpt/bytes"] / 1e9, r["ckpt/save_s"]
            return f"checkpoint step {r['step']}: {gb:.3f} GB in {seconds:.1f} s ({gb / max(seconds, 1e-9):.2f} GB/s)"
        if r["kind"] == "val":
            names = [k[len("val/loss_"):] for k in r if k.startswith("val/loss_")]
            return "\n".join(f"validation step {r['step']} [{n}] loss {r[f'val/loss_{n}']:.4f} "
                             f"ppl {r[f'val/ppl_{n}']:.2f} ({r[f'val/tokens_{n}']} tokens)" for n in names)
        losses = " ".join(f"{k[len('train/loss_'):]} {v:.4f}" for k, v in r.items() if k.startswith("train/loss_"))
        norms = " ".join(f"{v:.3f}" for k, v in r.items() if k.startswith("train/grad_norm_"))
        mfu = f" mfu {r['perf/mfu']:.1%}" if "perf/mfu" in r else ""
        return (f"step {r['step']}/{self.total_steps} loss {losses} lr {r['train/lr']:.3e} gnorm {norms} "
                f"{r['perf/tokens_per_s']:.0f} tok/s{mfu} eta {format_eta(r['perf/eta_s'])}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.writer.close()


def read_metrics(out_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a run folder in order (of one ``kind`` if given); [] when it has none."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        records += [json.loads(lines[-1])] if lines else []
    except json.JSONDecodeError:  # the last line of a run killed while writing it
        pass
    return [r for r in records if kind is None or r["kind"] == kind]


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
