"""Random-offset sampler of the adaptation phase (docs/spec.md §3, the reference's ``lm_random``).

Every sample is T + 1 consecutive tokens starting at a uniformly random token offset (with replacement) of
the training stream. The stream is the stored windows read as one flat sequence: window r holds stream
tokens ``[r*T, r*T + T]`` (consecutive windows share one token), so N windows give N*T + 1 tokens and a
slice at offset o is window o // T from o % T on, followed by the first o % T tokens after the shared one
of the next window. Folders written by several jobs are read back to back (a document may be cut at a seam,
as at any window edge).

Sample j of DP rank r is determined by (seed + r, j) alone: offsets are drawn in blocks of
``_BLOCK`` from a generator seeded with (seed + r, block), so resuming at sample j costs one block. The
windows are read by index, never through streaming's partitioning, so every rank of a DP replica (TP, CP
and PP peers alike) computes the same samples from its ``dp_rank`` without any communication.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from .loader import make_batch, open_train_windows
from .streaming import DataLayout, WindowDataset

__all__ = ["RandomOffsetSampler", "build_random_offset_loader"]

_BLOCK = 1024


class RandomOffsetSampler:
    """``(inputs, labels)`` micro-batches of (B, T) int64 built from random-offset slices; resumable.

    ``dataset`` needs random access to (T + 1,) windows in stored order (an unshuffled
    :class:`WindowDataset`). The state is the consumed-sample count over all DP ranks."""

    def __init__(self, dataset: WindowDataset, *, seq_len: int, batch_size: int, layout: DataLayout, seed: int,
                 eos_id: int):
        self.dataset, self.seq_len, self.batch_size, self.layout = dataset, seq_len, batch_size, layout
        self.seed, self.eos_id = seed, eos_id
        self.num_offsets = (dataset.num_samples - 1) * seq_len + 1
        self.rank_sample = 0
        self._block: tuple[int, np.ndarray] | None = None

    def offset(self, j: int) -> int:
        """Stream offset of this rank's sample ``j``."""
        block = j // _BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed + self.layout.dp_rank, block])
            self._block = (block, rng.integers(0, self.num_offsets, size=_BLOCK))
        return int(self._block[1][j % _BLOCK])

    def sample(self, j: int) -> np.ndarray:
        """This rank's sample ``j``: (T + 1,) tokens of the stream at :meth:`offset`."""
        t = self.seq_len
        k, r = divmod(self.offset(j), t)
        first = self.dataset[k]
        if r == 0:
            return first
        return np.concatenate([first[r:], self.dataset[k + 1][1: r + 1]])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            rows = [self.sample(self.rank_sample + i) for i in range(self.batch_size)]
            self.rank_sample += self.batch_size
            yield make_batch(rows, self.eos_id)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.rank_sample * self.layout.dp_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after ``consumed_samples``; with another DP size each rank resumes at
        consumed_samples // dp_size of its own stream (samples are drawn with replacement anyway)."""
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']} but the config gives {self.seed}; set "
                             f"data.shuffle_seed to {state['seed']} to resume this run")
        self.rank_sample = state["consumed_samples"] // self.layout.dp_size


def build_random_offset_loader(data, *, seq_len: int, vocab_size: int, eos_id: int, layout: DataLayout,
                               micro_batch_size: int, check_manifests: bool = True) -> RandomOffsetSampler:
    """The adaptation sampler over ``data.train`` (a :class:`DataConfig`; folders read back to back, weights
    not used), seeded ``data.shuffle_seed + dp_rank``. Same checks and shared-memory handling as
    :func:`~ratplus_mega.data.loader.open_train_windows`: call it on every rank (construction has a barrier
    when torch.distributed is initialized), before any other dataset."""
    if data.train_weights is not None:
        raise ValueError("data.train_weights: the random-offset sampler reads the folders as one stream; "
                         "remove the weights")
    dataset = open_train_windows(data, seq_len=seq_len, vocab_size=vocab_size, micro_batch_size=micro_batch_size,
                                 check_manifests=check_manifests, shuffle=None)
    return RandomOffsetSampler(dataset, seq_len=seq_len, batch_size=micro_batch_size, layout=layout,
                               seed=data.shuffle_seed, eos_id=eos_id)
