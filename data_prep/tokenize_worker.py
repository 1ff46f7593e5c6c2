"""Tokenizing worker of ``prep shards``: raw records → per-split token arrays (light imports: it is spawned).

The train/val decision hashes the document key ``"<input key>:<index>"`` with the seed, so it depends on
neither the worker count nor the order in which chunks are processed.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np

from .readers import BadRecord, Record, parse_record

__all__ = ["Chunk", "ChunkResult", "is_val_document", "init_worker", "tokenize_chunk"]

_STATE: dict = {}


@dataclass
class Chunk:
    """Consecutive records of one input, held column-wise: a few lists pickle many times faster than as many
    small objects. ``final`` marks the input's last chunk."""

    input_index: int
    input_key: str
    kind: str
    indices: list[int]
    lines: list[int]
    payloads: list
    final: bool

    @classmethod
    def of(cls, input_index: int, input_key: str, kind: str, records: list[Record], final: bool) -> "Chunk":
        return cls(input_index, input_key, kind, [r.index for r in records], [r.line for r in records],
                   [r.payload for r in records], final)


@dataclass
class ChunkResult:
    """Tokens of one chunk of records: per split, the documents' ids each followed by EOS, concatenated
    (uint32, in record order), and the document count; plus the records that gave no document."""

    input_index: int
    final: bool
    tokens: dict[str, np.ndarray]
    documents: dict[str, int]
    bad: list[BadRecord]


def is_val_document(key: str, *, seed: int, val_fraction: float) -> bool:
    """True when the document named ``key`` belongs to the validation split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def init_worker(tokenizer_path: str, text_field: str, seed: int, val_fraction: float) -> None:
    """Load the tokenizer once per worker process."""
    import sentencepiece as spm

    _STATE.update(sp=spm.SentencePieceProcessor(model_file=tokenizer_path), text_field=text_field, seed=seed,
                  val_fraction=val_fraction)


def tokenize_chunk(chunk: Chunk) -> ChunkResult:
    """Parse and tokenize one chunk; no BOS, one EOS per document."""
    sp = _STATE["sp"]
    texts: dict[str, list[str]] = {"train": [], "val": []}
    bad: list[BadRecord] = []
    for rec in map(Record, chunk.indices, chunk.lines, chunk.payloads):
        doc = parse_record(rec, kind=chunk.kind, text_field=_STATE["text_field"])
        if isinstance(doc, BadRecord):
            bad.append(doc)
            continue
        split = "val" if is_val_document(f"{chunk.input_key}:{rec.index}", seed=_STATE["seed"],
                                         val_fraction=_STATE["val_fraction"]) else "train"
        texts[split].append(doc)
    tokens = {}
    for split, docs in texts.items():
        ids = sp.encode(docs, add_eos=True, num_threads=1) if docs else []
        tokens[split] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32,
                                    count=sum(map(len, ids)))
    return ChunkResult(input_index=chunk.input_index, final=chunk.final, tokens=tokens,
                       documents={s: len(d) for s, d in texts.items()}, bad=bad)
