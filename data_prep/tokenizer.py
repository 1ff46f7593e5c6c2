"""Sentencepiece tokenizer loading with the id checks the data path relies on (docs/spec.md §5.1)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

__all__ = ["TokenizerInfo", "file_sha256", "load_tokenizer", "tokenizer_info"]


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo:
    """What shards and models must agree on about a tokenizer."""

    path: str
    """Absolute path of the ``.model`` file."""
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int
    """-1 when the model has no BOS piece (no BOS is ever written, spec §5.1)."""
    byte_fallback: bool
    """True when every byte has a piece: no text maps to ``<unk>``."""


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(path: str):
    """Load a sentencepiece ``.model``; raises ValueError naming the file if it is missing, unreadable or has
    no EOS piece (every document ends with EOS, spec §5.2)."""
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise ValueError(f"tokenizer {path}: no such file (train one with `ratplus prep tokenizer`)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer {path}: not a sentencepiece model ({e})") from None
    if sp.eos_id() < 0:
        raise ValueError(f"tokenizer {path}: the model has no EOS piece; train it with eos_id set (e.g. 2)")
    return sp


def tokenizer_info(path: str) -> TokenizerInfo:
    """Load ``path`` and describe it (see :class:`TokenizerInfo`)."""
    sp = load_tokenizer(path)
    byte_fallback = all(sp.PieceToId(f"<0x{b:02X}>") != sp.unk_id() for b in (0x00, 0x80, 0xFF))
    return TokenizerInfo(path=os.path.abspath(path), sha256=file_sha256(path), vocab_size=sp.GetPieceSize(),
                         eos_id=sp.eos_id(), bos_id=sp.bos_id(), byte_fallback=byte_fallback)
