"""The training loop's view of the data: N_acc micro-batches per global batch for this rank, exact state,
and the validation batches (``ratplus_mega/data`` does the reading, the step runner's feed says who reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch

from ..batch import Batch
from ..config.schema import RunConfig
from ..data.streaming import DataLayout, is_remote
from .feed import DirectFeed

_KEYS = ("input_ids", "labels")


class TrainData:
    """This rank's micro-batches, ``accum`` per global batch, read through ``feed``. Its state is the loader's,
    which counts only batches handed out; load it before the first :meth:`next_micro_batches`.

    Collective to build (streaming's dataset construction has barriers): call on every rank."""

    def __init__(self, feed, build: Callable[[DataLayout], object], accum: int):
        self.feed, self.accum, self.loader = feed, accum, None
        self._batches: Iterator | None = None
        if feed.reads:
            with feed.reading():
                self.loader = build(feed.layout())

    def next_micro_batches(self) -> list[Batch]:
        stacked = None
        if self.feed.reads:
            with self.feed.reading():
                if self._batches is None:
                    self._batches = iter(self.loader)
                pairs = [next(self._batches) for _ in range(self.accum)]
            stacked = {key: torch.stack([pair[i] for pair in pairs]) for i, key in enumerate(_KEYS)}
        stacked = self.feed.share(stacked)
        return [{key: value[i] for key, value in stacked.items()} for i in range(self.accum)]

    def state_dict(self) -> dict:
        if not self.feed.reads:
            return {}
        with self.feed.reading():
            return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._batches is not None:
            raise RuntimeError("load the data state before the first batch is read")
        if self.feed.reads:
            with self.feed.reading():
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
        if not is_remote(folder) and _sample_count(Path(folder) / "index.json") == 0:
            from ..errors import RatplusError

            more = "more text" if key != "data.val" else "a larger --val-fraction, or leave data.val out"
            raise RatplusError(f"{key}: {folder} holds no samples (its text was shorter than one window of "
                               f"model.seq_len + 1 = {cfg.model.seq_len + 1} tokens); give `ratplus prep shards` "
                               f"{more}")


def _sample_count(index: Path) -> int | None:
    """Samples an MDS ``index.json`` lists; None when it cannot be read (the loader then says why)."""
    import json

    try:
        return sum(int(shard.get("samples", 0)) for shard in json.loads(index.read_text()).get("shards", []))
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def build_train_data(cfg: RunConfig, feed, accum: int) -> TrainData:
    """The shuffled loader through ``feed``. The random-offset sampler draws by index from a per-DP-rank seed,
    so every rank of a replica computes its samples itself, whatever the feed."""
    from ..data.loader import build_train_loader
    from ..data.random_offset import build_random_offset_loader

    if cfg.data.sampler == "random_offset":
        feed, builder = DirectFeed(feed.ctx), build_random_offset_loader
    else:
        builder = build_train_loader

    def build(layout: DataLayout):
        return builder(cfg.data, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                       eos_id=cfg.model.eos_token_id, layout=layout, micro_batch_size=cfg.train.micro_batch_size)

    return TrainData(feed, build, accum)


def validation_batches(cfg: RunConfig, feed) -> Callable[[], Iterator[Batch]] | None:
    """A fresh pass over this rank's share of the validation windows per call, or None without ``data.val``.
    Collective to build: call on every rank after :func:`build_train_data`."""
    from ..data.eval_reader import build_val_reader

    if not cfg.data.val:
        return None
    max_windows = cfg.train.eval_tokens // cfg.model.seq_len if cfg.train.eval_tokens > 0 else None
    reader = None
    if feed.reads:
        with feed.reading():
            reader = build_val_reader(cfg.data.val, seq_len=cfg.model.seq_len, vocab_size=cfg.model.vocab_size,
                                      eos_id=cfg.model.eos_token_id, layout=feed.layout(),
                                      batch_size=cfg.train.micro_batch_size, max_windows=max_windows,
                                      cache_dir=cfg.data.cache_dir)
    return lambda: _batches(feed, reader)


def _batches(feed, reader) -> Iterator[Batch]:
    """The readers' validation batches on every rank that needs them; an empty batch marks the end."""
    pairs = iter(reader) if feed.reads else None
    while True:
        batch = None
        if feed.reads:
            with feed.reading():
                pair = next(pairs, None)
            batch = {} if pair is None else dict(zip(_KEYS, pair))
        batch = feed.share(batch)
        if not batch:
            return
        yield batch
