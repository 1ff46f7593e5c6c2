"""The config object megatron-core's layers and pipeline schedules read.

``ModelParallelConfig`` covers the layers; the schedules also read a handful of ``TransformerConfig`` fields.
Rather than build megatron's whole transformer config for a model that does not use its transformer, this
adds exactly those fields (megatron-core 0.16; ``tests/parallel/test_cpu_compat.py`` fails if the schedules
start reading one we do not define).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core import ModelParallelConfig


@dataclass
class StageConfig(ModelParallelConfig):
    hidden_size: int = 0
    """Width of the activations passed between pipeline stages ([T, B, hidden_size])."""
    calculate_per_token_loss: bool = False
    cuda_graph_impl: str = "none"
    cuda_graph_scope: str = "full"
    fine_grained_activation_offloading: bool = False
    mtp_num_layers: int | None = None
    num_moe_experts: int | None = None
