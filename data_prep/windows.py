"""Token stream → (seq_len + 1)-token windows with stride seq_len, written as MDS parts (docs/spec.md §5.2).

Consecutive windows overlap by one token, so window r holds stream tokens ``[r*T, r*T + T]``: inputs are its
first T tokens and labels its last T. A part is one input's windows; it is written under a hidden temporary
name and renamed into place only when complete, so a killed job never leaves a half-written shard under a
part's name. The tail that does not fill a window is carried into the next input's part.
"""

from __future__ import annotations

import functools
import os
import shutil

import numpy as np

__all__ = ["token_dtype", "column_encoding", "window_writer", "SplitWriter"]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def column_encoding(seq_len: int, dtype: np.dtype) -> str:
    """MDS encoding of the ``tokens`` column: a fixed-shape ndarray, so a sample costs no header bytes."""
    return f"ndarray:{dtype.name}:{seq_len + 1}"


def window_writer(out: str, *, seq_len: int, dtype: np.dtype, size_limit: int):
    """An ``MDSWriter`` for the ``tokens`` column that stores each window as its raw bytes.

    That is exactly streaming's encoding of a fixed-dtype, fixed-shape ndarray column (both are in the
    column's encoding string, so a sample has no header), without re-parsing the encoding string for every
    sample, which made MDS encoding cost a fifth of tokenization. The writer checks, once, that streaming
    still encodes a window to the same bytes."""
    from streaming import MDSWriter

    writer = _window_writer_class()(out=out, columns={"tokens": column_encoding(seq_len, dtype)},
                                    compression="zstd", size_limit=size_limit, max_workers=1)
    writer.window = (dtype, (seq_len + 1,))
    probe = {"tokens": np.arange(seq_len + 1, dtype=dtype)}
    if writer.encode_sample(probe) != MDSWriter.encode_sample(writer, probe):
        raise RuntimeError("streaming's MDS encoding of ndarray columns changed; pin mosaicml-streaming==0.13.0")
    return writer


@functools.cache
def _window_writer_class():
    """Defined on first use: importing streaming costs seconds (it imports torch)."""
    from streaming import MDSWriter

    class WindowWriter(MDSWriter):
        window: tuple[np.dtype, tuple[int]]

        def encode_sample(self, sample: dict) -> bytes:
            window = sample["tokens"]
            if (window.dtype, window.shape) != self.window:
                raise ValueError(f"window of dtype {window.dtype} and shape {window.shape}, expected "
                                 f"{self.window[0]} {self.window[1]}")
            return window.tobytes()

    return WindowWriter


class SplitWriter:
    """Cuts one split's token stream into windows and writes them as MDS parts under ``folder``.

    ``carry`` is the stream tail left by the previous part (empty at the start): at most ``seq_len`` tokens,
    the first of which already ends the previous part's last window."""

    def __init__(self, folder: str, *, seq_len: int, dtype: np.dtype, carry: np.ndarray, size_limit: int):
        self.folder, self.seq_len, self.dtype, self.size_limit = folder, seq_len, dtype, size_limit
        self.carry = carry.astype(dtype)
        self._writer = None
        self._tmp: str | None = None
        self.part_windows = 0

    def begin_part(self, name: str) -> None:
        """Start part ``name``; its windows go to a temporary folder until :meth:`end_part`."""
        self.name, self.part_windows = name, 0
        self._tmp = os.path.join(self.folder, f".{name}.tmp")
        shutil.rmtree(self._tmp, ignore_errors=True)

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens (1-D, any integer dtype) to the stream and write every window they complete."""
        stream = np.concatenate([self.carry, tokens.astype(self.dtype, copy=False)])
        n = (len(stream) - 1) // self.seq_len if len(stream) > self.seq_len else 0
        if n and self._writer is None:
            self._writer = window_writer(self._tmp, seq_len=self.seq_len, dtype=self.dtype,
                                         size_limit=self.size_limit)
        t = self.seq_len
        for r in range(n):
            self._writer.write({"tokens": stream[r * t: r * t + t + 1]})
        self.carry = stream[n * t:].copy()
        self.part_windows += n

    def end_part(self) -> int:
        """Finish the part: flush, fsync and rename it into place. Returns its window count (0: no folder)."""
        if self._writer is None:
            return 0
        self._writer.finish()
        self._writer = None
        for root, _, files in os.walk(self._tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.replace(self._tmp, os.path.join(self.folder, self.name))
        return self.part_windows
