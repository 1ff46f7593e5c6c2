"""How a run is laid out over ranks: process groups, megatron-core patches for CPU, the DeepSpeed mpu."""

from .context import ParallelContext

__all__ = ["ParallelContext"]
