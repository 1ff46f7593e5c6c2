"""The training loop's view of the data: N_acc micro-batches per global batch for this rank, exact state,
and the validation batches (``ratplus_mega/data`` does the reading)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..config.schema import RunConfig
from ..data.streaming import DataLayout, is_remote
from ..parallel.broadcast import broadcast_batch
from ..parallel.context import ParallelContext

Batch = dict[str, torch.Tensor]


class TrainData:
    """This rank's micro-batches, ``accum`` per global batch. Its state is the loader's, which counts only
    batches handed out; load it before the first :meth:`next_micro_batches`."""

    def __init__(self, loader, accum: int):
        self.loader, self.accum = loader, accum
        self._batches: Iterator | None = None

    def next_micro_batches(self) -> list[Batch]:
        if self._batches is None:
            self._batches = iter(self.loader)
        return [dict(zip(("input_ids", "labels"), next(self._batches))) for _ in range(self.accum)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._batches is not None:
            raise RuntimeError("load the data state before the first batch is read")
        self.loader.load_state_dict(state)


def check_data(cfg: RunConfig) -> None:
    """Start-up checks that need no dataset open: the folders exist and the layout can be fed."""
    if not cfg.data.train:
        raise ValueError("data.train: no training data given (prepare shards with `ratplus prep shards`)")
    for i, folder in enumerate(cfg.data.train + ([cfg.data.val] if cfg.data.val else [])):
        key = f"data.train[{i}]" if i < len(cfg.data.train) else "data.val"
        if not is_remote(folder) and not (Path(folder) / "index.json").is_file():
            raise ValueError(f"{key}: {folder} is not an MDS dataset (no index.json); prepare it with "
                             "`ratplus prep shards`")


def _layout(ctx: ParallelContext) -> DataLayout:
    return DataLayout(dp_rank=ctx.dp_rank, dp_size=ctx.dp, replication=ctx.tp * ctx.cp)


def build_train_data(cfg: RunConfig, ctx: ParallelContext, accum: int):
    """Collective (streaming's dataset construction has barriers): call on every rank, before validation.

    The shuffled loader serves tensor/context-parallel peers through streaming's ``replication`` when each
    DP replica is a block of consecutive ranks (pipeline_parallel = 1); with pipeline stages it is read by
    one rank per replica and broadcast (:class:`BroadcastTrainData`). The random-offset sampler draws by index
    from a per-DP-rank seed, so every rank of a replica computes the same samples itself."""
    from ..data.loader import build_train_loader
    from ..data.random_offset import build_random_offset_loader

    if cfg.data.sampler == "random_offset":
        return TrainData(_build(build_random_offset_loader, cfg, _layout(ctx)), accum)
    if ctx.pp == 1:
        return TrainData(_build(build_train_loader, cfg, _layout(ctx)), accum)
    return BroadcastTrainData(cfg, ctx, accum, ReaderGroup(ctx))


def _build(builder, cfg: RunConfig, layout: DataLayout):
    return builder(cfg.data, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                   eos_id=cfg.model.eos_token_id, layout=layout, micro_batch_size=cfg.train.micro_batch_size)


class ReaderGroup:
    """One reader per model-parallel group (its TP = PP = CP rank 0) reads for its DP replica and broadcasts
    to the group (DESIGN.md "Data under model parallelism"): the layout for pipeline stages, whose DP
    replicas are not blocks of consecutive ranks, so streaming's ``replication`` cannot serve them.

    Streaming takes its world from RANK/WORLD_SIZE and synchronises with group-less barriers, so readers
    build and read their datasets in :meth:`dp_world`: an environment that shows them as the DP world, with
    the barriers redirected to a group of the readers alone. The other ranks never touch streaming."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.is_reader = ctx.tp_rank == 0 and ctx.pp_rank == 0 and ctx.cp_rank == 0
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, self.is_reader)
        self.group = dist.new_group([rank for rank, flag in enumerate(flags) if flag])
        self.src = dist.get_global_rank(ctx.model_parallel_group, 0)
        self.local_rank, self.local_world = _local_position(self.group) if self.is_reader else (0, 1)

    @contextlib.contextmanager
    def dp_world(self):
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

    def layout(self) -> DataLayout:
        return DataLayout(dp_rank=self.ctx.dp_rank, dp_size=self.ctx.dp, replication=1)

    def share(self, batch: dict | None) -> dict:
        """The reader's ``batch`` on every rank of its model-parallel group ({} passes on as {})."""
        return broadcast_batch(batch, src=self.src, group=self.ctx.model_parallel_group, device=self.ctx.device)


class BroadcastTrainData:
    """:class:`TrainData` read by the :class:`ReaderGroup`'s readers and broadcast to their groups."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, accum: int, readers: ReaderGroup):
        from ..data.loader import build_train_loader

        self.readers, self.accum, self.inner = readers, accum, None
        if readers.is_reader:
            with readers.dp_world():
                self.inner = TrainData(_build(build_train_loader, cfg, readers.layout()), accum)

    def next_micro_batches(self) -> list[Batch]:
        stacked = None
        if self.readers.is_reader:
            with self.readers.dp_world():
                batches = self.inner.next_micro_batches()
            stacked = {key: torch.stack([b[key] for b in batches]) for key in batches[0]}
        stacked = self.readers.share(stacked)
        return [{key: value[i] for key, value in stacked.items()} for i in range(self.accum)]

    def state_dict(self) -> dict:
        if not self.readers.is_reader:
            return {}
        with self.readers.dp_world():
            return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.readers.is_reader:
            with self.readers.dp_world():
                self.inner.load_state_dict(state)


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


def validation_batches(cfg: RunConfig, ctx: ParallelContext) -> Callable[[], Iterator[Batch]] | None:
    """A fresh pass over this rank's share of the validation windows per call, or None without ``data.val``.
    Collective to build: call on every rank after :func:`build_train_data`."""
    from ..data.eval_reader import build_val_reader

    if not cfg.data.val:
        return None
    max_windows = cfg.train.eval_tokens // cfg.model.seq_len if cfg.train.eval_tokens > 0 else None

    def build(layout):
        return build_val_reader(cfg.data.val, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                                eos_id=cfg.model.eos_token_id, layout=layout, batch_size=cfg.train.micro_batch_size,
                                max_windows=max_windows, cache_dir=cfg.data.cache_dir)

    if ctx.pp == 1:
        reader = build(_layout(ctx))
        return lambda: ({"input_ids": inputs, "labels": labels} for inputs, labels in reader)
    readers = ReaderGroup(ctx)
    reader = None
    if readers.is_reader:
        with readers.dp_world():
            reader = build(readers.layout())
    return lambda: _shared_batches(readers, reader)


def _shared_batches(readers: ReaderGroup, reader) -> Iterator[Batch]:
    """The readers' validation batches on every rank of their groups; an empty batch marks the end."""
    batches = iter(reader) if readers.is_reader else None
    while True:
        batch = None
        if readers.is_reader:
            with readers.dp_world():
                inputs_labels = next(batches, None)
            batch = {} if inputs_labels is None else dict(zip(("input_ids", "labels"), inputs_labels))
        batch = readers.share(batch)
        if not batch:
            return
        yield batch
