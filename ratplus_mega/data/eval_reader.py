"""Exact validation reader: every window of an MDS folder once, split disjointly across DP ranks.

Streaming pads each rank's partition by repeating samples, so validation reads by index instead: DP rank
r of n reads windows ``[r*N//n, (r+1)*N//n)`` in stored order through the dataset's random access (which
still downloads and decompresses shards as needed). Ranks may get one window more than others and the last
batch may be short: the metric is a token-weighted sum reduced once at the end (docs/spec.md §5.3).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .loader import check_window_length, make_batch
from .streaming import DataLayout, WindowDataset, build_window_dataset

__all__ = ["ValidationReader", "build_val_reader"]


class ValidationReader:
    """``(inputs, labels)`` batches, each (b, T) int64 with b <= ``batch_size``, of this rank's share of the
    first ``max_windows`` windows (all when None); masked like training (:func:`make_batch`)."""

    def __init__(self, dataset: WindowDataset, *, batch_size: int, layout: DataLayout, eos_id: int,
                 max_windows: int | None = None):
        self.dataset, self.batch_size, self.eos_id = dataset, batch_size, eos_id
        total = dataset.num_samples if max_windows is None else min(max_windows, dataset.num_samples)
        n, r = layout.dp_size, layout.dp_rank
        self.windows = range(r * total // n, (r + 1) * total // n)

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.windows), self.batch_size):
            ids = self.windows[start: start + self.batch_size]
            yield make_batch([self.dataset[i] for i in ids], self.eos_id)


def build_val_reader(folder: str, *, seq_len: int, vocab_size: int, eos_id: int, layout: DataLayout,
                     batch_size: int, max_windows: int | None = None, cache_dir: str | None = None,
                     check_manifests: bool = True) -> ValidationReader:
    """A :class:`ValidationReader` over one MDS folder (local or remote), checked against the model like
    the training data. Build it on every rank (dataset construction has a barrier when torch.distributed is
    initialized), in the same order on every rank."""
    from ratplus_mega.data_prep.manifest import check_manifest

    if check_manifests and "://" not in folder:
        check_manifest(folder, seq_len=seq_len, vocab_size=vocab_size)
    dataset = build_window_dataset([folder], batch_size=batch_size, shuffle=None, cache_dir=cache_dir)
    check_window_length(dataset, seq_len, folder)
    return ValidationReader(dataset, batch_size=batch_size, layout=layout, eos_id=eos_id, max_windows=max_windows)
