"""Per-DP-rank training batches from (T + 1)-token windows, resumable from the consumed-sample count.

Batches are ``(inputs, labels)``, both (B, T) int64: inputs = window[:-1], labels = window[1:] with -100
where the *input* token is EOS (docs/spec.md §5.2: the first token of the next document is not predicted
from the EOS). The state is the position in the global sample order, counted over DP replicas
(``batches yielded * batch_size * dp_size``), plus the pinned shuffle, so a run resumes exactly, also on a
different number of DP ranks within an epoch (streaming repartitions the remaining samples).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from streaming.base.world import World

from ..batch import IGNORE_INDEX
from .streaming import DataLayout, ShuffleParams, WindowDataset, build_window_dataset, window_length

__all__ = ["make_batch", "TrainLoader", "build_train_loader", "check_window_length", "open_train_windows"]


def make_batch(windows: Sequence[np.ndarray] | np.ndarray, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split B windows of T + 1 tokens (any integer dtype) into inputs and labels, each (B, T) int64;
    labels are ``IGNORE_INDEX`` where the input token is ``eos_id``. Also the DataLoader's collate function,
    so that with loader workers the batches are built there."""
    windows = np.stack(windows)
    inputs = windows[:, :-1]
    labels = np.where(inputs == eos_id, np.int64(IGNORE_INDEX), windows[:, 1:])
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels.astype(np.int64, copy=False))


def check_window_length(dataset: WindowDataset, seq_len: int, where: str) -> None:
    """Raise ValueError naming ``where`` and both values unless the shards hold seq_len + 1 windows."""
    length = window_length(dataset)
    if length != seq_len + 1:
        raise ValueError(f"{where}: shards hold windows of {length} tokens (seq_len {length - 1}) but the model's "
                         f"seq_len is {seq_len}; re-run `ratplus prep shards --seq-len {seq_len}`")


class TrainLoader:
    """Iterates ``(inputs, labels)`` micro-batches of one DP rank for ever, epoch after epoch.

    The state counts only batches handed to the caller (the DataLoader prefetches ahead), so save it
    after the step that consumed the last batch. :meth:`load_state_dict` must come before iterating."""

    def __init__(self, dataset: WindowDataset, *, batch_size: int, layout: DataLayout, eos_id: int,
                 shuffle: ShuffleParams, num_workers: int = 0):
        self.dataset, self.batch_size, self.layout, self.eos_id = dataset, batch_size, layout, eos_id
        self.shuffle, self.num_workers = shuffle, num_workers
        self.epoch, self.sample_in_epoch = 0, 0
        # Streaming keeps the first run's node count to keep the order when the node count changes.
        self.initial_physical_nodes = World.detect().replicate(layout.replication).num_nodes

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        while True:
            # A new DataLoader iterator per epoch: streaming starts the next epoch (or the resumed one).
            loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                collate_fn=functools.partial(make_batch, eos_id=self.eos_id),
                                persistent_workers=False,
                                pin_memory=torch.cuda.is_available())  # the step runner copies without blocking
            for batch in loader:
                self.sample_in_epoch += self.batch_size * self.layout.dp_size
                yield batch
            self.epoch, self.sample_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Position in the global sample order and the pinned shuffle (identical on every rank)."""
        return {"epoch": self.epoch, "sample_in_epoch": self.sample_in_epoch,
                "num_canonical_nodes": self.shuffle.num_canonical_nodes, "shuffle_seed": self.shuffle.seed,
                "shuffle_algo": self.shuffle.algo, "initial_physical_nodes": self.initial_physical_nodes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; raises ValueError if its shuffle differs from this loader's."""
        for key, mine in (("shuffle_seed", self.shuffle.seed), ("shuffle_algo", self.shuffle.algo),
                          ("num_canonical_nodes", self.shuffle.num_canonical_nodes)):
            if state[key] != mine:
                raise ValueError(f"data loader state has {key}={state[key]!r} but the config gives {mine!r}; "
                                 f"set data.{key} to {state[key]!r} to resume this run")
        self.epoch, self.sample_in_epoch = state["epoch"], state["sample_in_epoch"]
        self.initial_physical_nodes = state["initial_physical_nodes"]
        self.dataset.load_state_dict({k: state[k] for k in ("epoch", "sample_in_epoch", "num_canonical_nodes",
                                                            "shuffle_seed", "initial_physical_nodes")})


def open_train_windows(data, *, seq_len: int, vocab_size: int, micro_batch_size: int, check_manifests: bool,
                       shuffle: ShuffleParams | None, replication: int = 1) -> WindowDataset:
    """``data.train``'s folders (a :class:`DataConfig`) as one window dataset, after checking each local
    folder's manifest and every shard's window length against the model (ValueError naming the file and both
    values). Collective when torch.distributed is initialized (construction has barriers): call on every rank.
    Streaming's stale shared memory is cleaned when the dataset registers (only what no live process holds:
    :mod:`.streaming`)."""
    from ratplus_mega.data_prep.manifest import check_manifest

    if check_manifests:
        for folder in data.train:
            if "://" not in folder:
                check_manifest(folder, seq_len=seq_len, vocab_size=vocab_size)
    weights = data.train_weights if shuffle is not None else None
    dataset = build_window_dataset(data.train, batch_size=micro_batch_size, shuffle=shuffle, weights=weights,
                                   replication=replication, cache_dir=data.cache_dir)
    check_window_length(dataset, seq_len, ", ".join(data.train))
    return dataset


def build_train_loader(data, *, seq_len: int, vocab_size: int, eos_id: int, layout: DataLayout,
                       micro_batch_size: int, check_manifests: bool = True) -> TrainLoader:
    """The shuffled training loader of ``data`` (a :class:`DataConfig`) for one rank, after checking the
    layout against RANK/WORLD_SIZE (see :func:`open_train_windows` for the rest)."""
    layout.check_environment()
    shuffle = ShuffleParams(seed=data.shuffle_seed, algo=data.shuffle_algo,
                            num_canonical_nodes=data.num_canonical_nodes)
    dataset = open_train_windows(data, seq_len=seq_len, vocab_size=vocab_size, micro_batch_size=micro_batch_size,
                                 check_manifests=check_manifests, shuffle=shuffle, replication=layout.replication)
    return TrainLoader(dataset, batch_size=micro_batch_size, layout=layout, eos_id=eos_id, shuffle=shuffle,
                       num_workers=data.num_workers)
