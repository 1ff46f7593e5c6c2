"""The ``mpu`` object DeepSpeed asks for, with the semantics docs/parallelism.md records.

- "model parallel" is tensor x pipeline parallel: DeepSpeed names checkpoint files ``mp_rank_XX`` by this
  rank and all-reduces the gradient norm over this group (a TP-only answer would make pipeline stages
  overwrite each other's files and undercount the norm);
- ``get_tensor_model_parallel_rank`` is the TP rank (DeepSpeed counts replicated parameters once with it);
- context parallel is DeepSpeed's "sequence parallel": the data-parallel group and size are the DP replicas
  only (DeepSpeed's batch arithmetic counts them), the sequence-data-parallel group is DP x CP (ZeRO partitions
  over it and sums gradients in it, dividing by DP only: the CP ranks' gradients are parts of one sum).
"""

from __future__ import annotations

import torch.distributed as dist

from .context import ParallelContext


class DeepSpeedMpu:
    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    # model parallel = TP x PP
    def get_model_parallel_group(self):
        return self.ctx.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return self.ctx.tp * self.ctx.pp

    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return self.ctx.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.ctx.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.ctx.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_src_rank()

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self.ctx.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.ctx.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.ctx.pp

    # data parallel: the replicas the batch is split over
    def get_data_parallel_group(self):
        return self.ctx.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.ctx.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.ctx.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # context parallel, in DeepSpeed's sequence-parallel vocabulary
    def get_sequence_parallel_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    def get_sequence_parallel_rank(self) -> int:
        return self.ctx.cp_rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.ctx.cp

    # DP x CP: what ZeRO partitions over and reduces gradients in
    def get_sequence_data_parallel_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self.get_sequence_data_parallel_group())

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.ctx.dp * self.ctx.cp
