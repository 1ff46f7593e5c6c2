"""MosaicML ``StreamingDataset`` over ``prep shards`` output: pinned shuffle, mixtures, model-parallel replication.

Streaming takes its rank from ``RANK``/``WORLD_SIZE`` (DESIGN.md "Data under model parallelism"). With
``replication = tp * cp`` and each DP replica a block of consecutive ranks (PP = 1, megatron's rank order),
streaming gives the peers of a replica bitwise-identical samples and counts its world in DP ranks.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.format.mds.reader import MDSReader

__all__ = ["DataLayout", "ShuffleParams", "WindowDataset", "build_window_dataset", "is_remote", "window_length"]


def is_remote(path: str) -> bool:
    return "://" in path


@dataclass(frozen=True, kw_only=True)
class DataLayout:
    """Where this process sits among the readers: its data-parallel rank and size, and how many consecutive
    global ranks (TP x CP peers) share each DP replica's batches."""

    dp_rank: int = 0
    dp_size: int = 1
    replication: int = 1

    def __post_init__(self):
        if not 0 <= self.dp_rank < self.dp_size or self.replication < 1:
            raise ValueError(f"bad data layout: dp_rank {self.dp_rank}, dp_size {self.dp_size}, "
                             f"replication {self.replication}")

    def check_environment(self) -> None:
        """Raise ValueError unless RANK/WORLD_SIZE place this process in DP replica ``dp_rank`` of ``dp_size``
        blocks of ``replication`` consecutive ranks: the only layout streaming's ``replication`` serves."""
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if world != self.dp_size * self.replication or rank // self.replication != self.dp_rank:
            raise ValueError(
                f"data layout dp_rank={self.dp_rank} dp_size={self.dp_size} replication={self.replication} does "
                f"not match RANK={rank} WORLD_SIZE={world}: streaming replication needs each DP replica to be "
                "a block of consecutive ranks (pipeline_parallel=1, megatron rank order)")


@dataclass(frozen=True, kw_only=True)
class ShuffleParams:
    """The shuffle, pinned: the order must not depend on the first run's node count (DESIGN.md "Streaming")."""

    seed: int
    algo: str = "py1e"
    num_canonical_nodes: int = 1


class _OpenShards:
    """The most recently read shard files, kept open (a bounded number: datasets have thousands of shards)."""

    def __init__(self, limit: int = 64):
        self.limit, self.fds = limit, OrderedDict()

    def fd(self, path: str) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)  # FileNotFoundError: streaming fetches the shard
            if len(self.fds) > self.limit:
                os.close(self.fds.popitem(last=False)[1])
        else:
            self.fds.move_to_end(path)
        return fd


_OPEN_SHARDS = _OpenShards()


class _PreadMDSReader(MDSReader):
    """streaming's MDS shard reader with the sample read as two ``pread`` calls on a kept-open file, instead of
    open, two seeks, two reads and close per sample (the loader's largest cost). Shards never change once
    written, so a file kept open after streaming evicts and re-fetches it still holds the same bytes; ``pread``
    has no file offset, so forked loader workers may share the descriptors."""

    def get_sample_data(self, idx: int) -> bytes:
        fd = _OPEN_SHARDS.fd(os.path.join(self.dirname, self.split, self.raw_data.basename))
        begin, end = np.frombuffer(os.pread(fd, 8, (1 + idx) * 4), np.uint32)
        data = os.pread(fd, int(end - begin), int(begin))
        if not data:
            raise IndexError(f"sample {idx} is not in {self.raw_data.basename}")
        return data


class WindowDataset(StreamingDataset):
    """Samples are the ``tokens`` windows as ``np.ndarray`` of shape (T + 1,), uint16 or uint32."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for shard in self.shards:
            if type(shard) is MDSReader:
                shard.__class__ = _PreadMDSReader

    def get_item(self, idx: int) -> np.ndarray:
        return super().get_item(idx)["tokens"]


def window_length(dataset: StreamingDataset) -> int:
    """T + 1 of the windows, read from the shards' column encoding (``ndarray:<dtype>:<T+1>``).

    Raises ValueError when a shard does not hold fixed-length ``tokens`` windows."""
    lengths = set()
    for shard in dataset.shards:
        encodings = dict(zip(shard.column_names, shard.column_encodings))
        enc = encodings.get("tokens", "")
        parts = enc.split(":")
        if len(parts) != 3 or parts[0] != "ndarray":
            raise ValueError(f"{shard.dirname}: shards hold no fixed-length 'tokens' windows (got {enc!r}); "
                             "write them with `ratplus prep shards`")
        lengths.add(int(parts[2]))
    if len(lengths) != 1:
        raise ValueError(f"datasets mix window lengths {sorted(lengths)}: all must be written with one --seq-len")
    return lengths.pop()


def _local_for(path: str, cache_dir: str | None) -> dict[str, Any]:
    if not is_remote(path):
        return {"local": path}
    if not cache_dir:
        raise ValueError(f"{path} is remote: set data.cache_dir to a local folder to cache it in")
    name = path.split("://", 1)[1].strip("/").replace("/", "_")
    return {"remote": path, "local": os.path.join(cache_dir, name)}


def build_window_dataset(folders: list[str], *, batch_size: int, shuffle: ShuffleParams | None,
                         weights: list[float] | None = None, replication: int = 1,
                         cache_dir: str | None = None) -> WindowDataset:
    """A :class:`WindowDataset` over MDS folders (local paths or remote URLs).

    ``weights`` become ``Stream(proportion=w / sum(weights))``; None reads each folder once per epoch.
    ``shuffle`` None keeps the stored order (random access and the random-offset sampler). ``batch_size``
    is the per-rank micro-batch size (streaming needs it for deterministic resumption)."""
    if not folders:
        raise ValueError("no datasets given (data.train is empty)")
    total = sum(weights) if weights else None
    streams = [Stream(**_local_for(f, cache_dir), proportion=(w / total if total else None))
               for f, w in zip(folders, weights or [None] * len(folders))]
    kwargs: dict[str, Any] = {"shuffle": False}
    if shuffle is not None:
        kwargs = {"shuffle": True, "shuffle_seed": shuffle.seed, "shuffle_algo": shuffle.algo,
                  "num_canonical_nodes": shuffle.num_canonical_nodes}
    else:
        kwargs["num_canonical_nodes"] = 1
    return WindowDataset(streams=streams, batch_size=batch_size, replication=replication if replication > 1 else None,
                         **kwargs)
