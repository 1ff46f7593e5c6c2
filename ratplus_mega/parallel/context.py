"""The one object that knows the run's layout: built once from ``ParallelConfig``, passed explicitly.

It wraps ``megatron.core.parallel_state`` (whose globals the megatron-core layers read) so the rest of the
project never touches those globals directly. Megatron's rank order is tp-cp-dp-pp: tensor-parallel peers
are consecutive ranks, then context-parallel peers, then data-parallel replicas, then pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config.schema import ParallelConfig


@dataclass(frozen=True)
class ParallelContext:
    """Sizes, ranks and process groups of the current process."""

    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    sequence_parallel: bool
    cp_order: str = "zigzag"
    """How a sequence is cut over the context-parallel ranks (``parallel.context_parallel_order``)."""

    @classmethod
    def initialize(cls, parallel: ParallelConfig) -> "ParallelContext":
        """Create the process groups (``torch.distributed`` must be initialised; gloo or nccl)."""
        from megatron.core import parallel_state as ps

        from .cpu_compat import apply_cpu_patches

        if not dist.is_initialized():
            raise RuntimeError("ParallelContext.initialize needs torch.distributed to be initialised first")
        world = dist.get_world_size()
        if world % parallel.model_parallel_size:
            raise ValueError(
                f"world size {world} is not divisible by tensor x pipeline x context parallel "
                f"= {parallel.tensor_parallel} x {parallel.pipeline_parallel} x {parallel.context_parallel}"
            )
        apply_cpu_patches()
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
            create_gloo_process_groups=False,
        )
        return cls(
            tp=parallel.tensor_parallel, pp=parallel.pipeline_parallel, cp=parallel.context_parallel,
            dp=world // parallel.model_parallel_size,
            tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
            sequence_parallel=parallel.sequence_parallel, cp_order=parallel.context_parallel_order,
        )

    # Process groups are looked up on demand: they are not picklable and belong to parallel_state.
    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    @property
    def cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @property
    def model_parallel_group(self):
        """Tensor x pipeline parallel peers (DeepSpeed's "model parallel" group)."""
        from megatron.core import parallel_state as ps

        return ps.get_model_parallel_group()

    @property
    def embedding_group(self):
        """First and last pipeline stage of this pipeline (they hold the two tied-embedding copies)."""
        from megatron.core import parallel_state as ps

        return ps.get_embedding_group()

    @property
    def device(self) -> torch.device:
        """Where this rank computes and communicates: its CUDA device, or the CPU (gloo)."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def sizes(self) -> dict[str, int]:
        """The layout as checkpoints record it."""
        return {"tp": self.tp, "pp": self.pp, "cp": self.cp, "dp": self.dp}

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def megatron_config(self, hidden_size: int, params_dtype: torch.dtype = torch.float32):
        """The config megatron-core layers and schedules read. Weights are allocated on the CPU and set by
        ``model/init.py`` (layout-free), never by megatron."""
        from .megatron_config import StageConfig

        return StageConfig(
            hidden_size=hidden_size,
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            sequence_parallel=self.sequence_parallel,
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            use_cpu_initialization=True,
            perform_initialization=False,
            batch_p2p_comm=False,  # gloo: batched P2P silently swaps tensors (docs/parallelism.md)
        )
