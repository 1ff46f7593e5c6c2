"""The training loop's view of the data: N_acc micro-batches per global batch for this rank, exact state,
and the validation batches (``ratplus_mega/data`` does the reading)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config.schema import RunConfig
from ..data.streaming import DataLayout, is_remote
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
    if cfg.parallel.pipeline_parallel > 1:
        raise ValueError("parallel.pipeline_parallel: the training data reader feeds tensor/context-parallel "
                         "peers but not yet pipeline stages; train with pipeline_parallel=1")


def _layout(ctx: ParallelContext) -> DataLayout:
    return DataLayout(dp_rank=ctx.dp_rank, dp_size=ctx.dp, replication=ctx.tp * ctx.cp)


def build_train_data(cfg: RunConfig, ctx: ParallelContext, accum: int) -> TrainData:
    """Collective (streaming's dataset construction has barriers): call on every rank, before validation."""
    from ..data.loader import build_train_loader
    from ..data.random_offset import build_random_offset_loader

    build = build_train_loader if cfg.data.sampler == "ordered" else build_random_offset_loader
    loader = build(cfg.data, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                   eos_id=cfg.model.eos_token_id, layout=_layout(ctx), micro_batch_size=cfg.train.micro_batch_size)
    return TrainData(loader, accum)


def validation_batches(cfg: RunConfig, ctx: ParallelContext) -> Callable[[], Iterator[Batch]] | None:
    """A fresh pass over this rank's share of the validation windows per call, or None without ``data.val``.
    Collective to build: call on every rank after :func:`build_train_data`."""
    from ..data.eval_reader import build_val_reader

    if not cfg.data.val:
        return None
    max_windows = cfg.train.eval_tokens // cfg.model.seq_len if cfg.train.eval_tokens > 0 else None
    reader = build_val_reader(cfg.data.val, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                              eos_id=cfg.model.eos_token_id, layout=_layout(ctx),
                              batch_size=cfg.train.micro_batch_size, max_windows=max_windows,
                              cache_dir=cfg.data.cache_dir)
    return lambda: ({"input_ids": inputs, "labels": labels} for inputs, labels in reader)
