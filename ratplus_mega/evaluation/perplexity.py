"""Perplexity per pattern: the token-weighted mean cross-entropy the trainer's validation computes
(docs/spec.md §5.3), over an MDS validation split read by the trainer's exact reader, or over text files cut
into windows the way ``ratplus prep shards`` cuts them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import IGNORE_INDEX
from ..errors import RatplusError

Windows = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""A fresh pass over (inputs, labels) batches, each (B, T) int64."""


def mds_windows(folder: str | Path, *, seq_len: int, vocab_size: int, eos_id: int, batch_size: int,
                max_tokens: int | None) -> Windows:
    """The windows of an MDS split (``prep shards``' ``val`` folder): the first ``max_tokens // seq_len``
    (all when None), in stored order: the windows the trainer validates on with ``train.eval_tokens``."""
    from ..data.eval_reader import build_val_reader
    from ..data.streaming import DataLayout

    if not (Path(folder) / "index.json").is_file() and "://" not in str(folder):
        raise RatplusError(f"--val {folder}: not an MDS split folder (no index.json); pass a prep shards split "
                           "such as DATA/val")
    max_windows = max_tokens // seq_len if max_tokens else None
    reader = build_val_reader(str(folder), seq_len=seq_len, vocab_size=vocab_size, eos_id=eos_id,
                              layout=DataLayout(), batch_size=batch_size, max_windows=max_windows)
    return lambda: iter(reader)


def text_windows(files: list[str], encode: Callable[[str], list[int]], *, seq_len: int, eos_id: int,
                 batch_size: int, max_tokens: int | None) -> Windows:
    """Documents of .txt/.jsonl/.parquet files (one per line of jsonl, per file of txt), each encoded and
    followed by EOS, concatenated and cut into (seq_len + 1)-token windows with stride seq_len as
    ``prep shards`` does; the tail that does not fill a window is dropped unless it is all there is."""
    from ratplus_mega.data_prep.readers import BadRecord, expand_inputs, iter_records, parse_record

    from ..data.loader import make_batch

    stream: list[int] = []
    for inp in expand_inputs(files):
        for rec in iter_records(inp, text_field="text", txt_blocks=False):
            doc = parse_record(rec, kind=inp.kind, text_field="text")
            if not isinstance(doc, BadRecord):
                stream += encode(doc) + [eos_id]
    if len(stream) < 2:
        raise RatplusError(f"--text {' '.join(files)}: no text to evaluate")
    starts = list(range(0, len(stream) - seq_len, seq_len)) or [0]
    if max_tokens:
        starts = starts[:max(1, max_tokens // seq_len)]
    windows = [np.asarray(stream[s:s + seq_len + 1], dtype=np.int64) for s in starts]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            if len({len(w) for w in chunk}) == 1:
                yield make_batch(chunk, eos_id)
            else:
                yield from (make_batch([w], eos_id) for w in chunk)
    return batches


@torch.no_grad()
def cross_entropy(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: Windows) -> dict:
    """``{"loss", "ppl", "tokens"}``: the token-weighted mean cross-entropy of ``logits_fn`` over the
    targets not ignored, and its exponential (the trainer's formula, in fp64 sums)."""
    total, tokens = 0.0, 0
    for inputs, labels in windows():
        logits = logits_fn(inputs)
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").double().item()
        tokens += int((labels != IGNORE_INDEX).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
