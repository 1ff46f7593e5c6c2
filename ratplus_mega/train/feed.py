"""How batches reach the ranks of a layout: every rank reads its own, or one reader per model-parallel group
reads and broadcasts. Chosen once by the step runner; the data feed and validation use it without knowing
which.

Streaming takes its rank from RANK/WORLD_SIZE. When each data-parallel replica is a block of consecutive
ranks (pipeline_parallel = 1, megatron's rank order), streaming's ``replication`` hands tensor/context-parallel
peers identical batches, so every rank reads (:class:`DirectFeed`). Pipeline stages break that order, so one
reader per model-parallel group reads for its replica and broadcasts (:class:`BroadcastFeed`).
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch.distributed as dist

from ..batch import Batch
from ..data.streaming import DataLayout
from ..parallel.broadcast import broadcast_batch
from ..parallel.context import ParallelContext


class DirectFeed:
    """Every rank reads its own batches; tensor/context-parallel peers through streaming's replication."""

    def __init__(self, ctx: ParallelContext):
        self.ctx, self.reads = ctx, True

    def layout(self) -> DataLayout:
        return DataLayout(dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp, replication=self.ctx.tp * self.ctx.cp)

    @contextlib.contextmanager
    def reading(self):
        yield

    def share(self, batch: Batch | None) -> Batch:
        return batch


class BroadcastFeed:
    """One reader per data-parallel replica (its TP = PP = CP rank 0) reads and broadcasts to the replica: over
    its tensor x pipeline group, then (context parallel) from each CP rank 0 over its CP group.

    Readers build and read their datasets in :meth:`reading`: an environment that shows them as the DP world,
    with streaming's group-less barriers redirected to a group of the readers alone (construction calls the
    default group's barrier, which non-readers never join). The other ranks never touch streaming."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.reads = ctx.tp_rank == 0 and ctx.pp_rank == 0 and ctx.cp_rank == 0
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, self.reads)
        self.group = dist.new_group([rank for rank, flag in enumerate(flags) if flag])
        self.src = dist.get_global_rank(ctx.model_parallel_group, 0)
        self.local_rank, self.local_world = _local_position(self.group) if self.reads else (0, 1)

    def layout(self) -> DataLayout:
        return DataLayout(dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp, replication=1)

    @contextlib.contextmanager
    def reading(self):
        env = {"RANK": str(self.ctx.dp_rank), "WORLD_SIZE": str(self.ctx.dp), "LOCAL_RANK": str(self.local_rank),
               "LOCAL_WORLD_SIZE": str(self.local_world)}
        saved = {k: os.environ.get(k) for k in env}
        barrier = dist.barrier
        os.environ.update(env)
        dist.barrier = lambda *args, **kwargs: barrier(group=self.group)
        try:
            yield
        finally:
            dist.barrier = barrier
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def share(self, batch: Batch | None) -> Batch:
        """The reader's ``batch`` on every rank of its replica ({} passes on as {})."""
        ctx = self.ctx
        if ctx.cp_rank == 0:
            batch = broadcast_batch(batch, src=self.src, group=ctx.model_parallel_group, device=ctx.device)
        if ctx.cp > 1:
            batch = broadcast_batch(batch if ctx.cp_rank == 0 else None, src=dist.get_global_rank(ctx.cp_group, 0),
                                    group=ctx.cp_group, device=ctx.device)
        return batch


def _local_position(readers_group) -> tuple[int, int]:
    """This reader's index among the readers on its host, and how many there are (streaming's node view)."""
    hosts = [None] * dist.get_world_size(readers_group)
    dist.all_gather_object(hosts, socket.gethostname(), group=readers_group)
    mine = dist.get_rank(readers_group)
    same = [i for i, host in enumerate(hosts) if host == hosts[mine]]
    if same != list(range(same[0], same[0] + len(same))):
        raise ValueError("pipeline-parallel data readers of one host must have consecutive data-parallel ranks "
                         "(megatron's rank order places them so; check the launcher's rank assignment)")
    return same.index(mine), len(same)
