"""megatron-core on CPU/gloo: the few patches its layers and schedules need when CUDA is absent.

Measured with megatron-core 0.16.x (docs/parallelism.md, "On CPU (gloo)"): non-sequence-parallel TP layers
work unpatched; sequence parallel allocates its gather buffers on ``torch.cuda.current_device()``; the RNG
tracker (activation recompute) saves and restores CUDA generator states; the pipeline schedules allocate a
token counter with ``device="cuda"``. Each patch replaces exactly one of those and is applied only when
CUDA is unavailable. ``tests/parallel/test_cpu_compat.py`` fails if a pinned name moves.
"""

from __future__ import annotations

import functools

import torch

PATCHED_NAMES = (
    "torch.cuda.current_device",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.pipeline_parallel.schedules.torch",
)
_applied = False


def apply_cpu_patches() -> bool:
    """Patch megatron-core for CPU when CUDA is absent; idempotent. Returns whether patches are in place."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mc_random

    torch.cuda.current_device = lambda: "cpu"
    mc_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    schedules.torch = _TorchWithCpuDefault(torch)
    _applied = True
    return True


class _TorchWithCpuDefault:
    """``torch`` as seen by the pipeline schedules: ``zeros(..., device="cuda")`` lands on the CPU."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if name in ("zeros", "empty", "ones", "tensor"):
            return functools.partial(_on_cpu, attr)
        return attr


def _on_cpu(factory, *args, **kwargs):
    if kwargs.get("device") == "cuda":
        kwargs["device"] = "cpu"
    return factory(*args, **kwargs)
