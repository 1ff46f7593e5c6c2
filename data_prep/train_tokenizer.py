"""``ratplus prep tokenizer``: train a lossless sentencepiece model with LLaMA's special ids.

Lossless (docs/decisions.md, "Data"): identity normalization, whitespace kept as is, whitespace-only pieces
allowed, byte fallback (no text maps to ``<unk>``). Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no padding
piece, as in the LLaMA tokenizer of docs/spec.md §5.1. Documents are fed line by line (sentencepiece
skips sentences longer than ``max_sentence_length``); a newline is then encoded by byte fallback, as
LLaMA's tokenizer does.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from typing import Iterator

from ratplus_mega.errors import RatplusError

from .readers import BadRecord, expand_inputs, iter_records, parse_record

__all__ = ["TokenizerOptions", "train_tokenizer"]


@dataclass(frozen=True, kw_only=True)
class TokenizerOptions:
    """Arguments of :func:`train_tokenizer` (the CLI flags of ``ratplus prep tokenizer``)."""

    inputs: list[str]
    vocab_size: int
    out: str
    """Path of the ``.model`` to write (a ``.vocab`` is written beside it)."""
    model_type: str = "bpe"
    text_field: str = "text"
    txt_blocks: bool = False
    max_sentences: int = 10_000_000
    """Lines sampled for training (sentencepiece's ``input_sentence_size``)."""
    character_coverage: float = 0.99995
    num_threads: int = 2

    def __post_init__(self):
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"--model-type must be bpe or unigram, got {self.model_type!r}")
        if self.vocab_size < 260:
            raise ValueError(f"--vocab-size must be >= 260 (256 byte pieces + specials), got {self.vocab_size}")
        if not self.out.endswith(".model"):
            raise ValueError(f"--out must end with .model, got {self.out!r}")


def _lines(opts: TokenizerOptions) -> Iterator[str]:
    for inp in expand_inputs(opts.inputs):
        for rec in iter_records(inp, text_field=opts.text_field, txt_blocks=opts.txt_blocks):
            doc = parse_record(rec, kind=inp.kind, text_field=opts.text_field)
            if not isinstance(doc, BadRecord):
                yield from (line for line in doc.split("\n") if line.strip())


def train_tokenizer(opts: TokenizerOptions) -> str:
    """Train on the inputs' documents and write ``opts.out``; returns its path.

    Raises ValueError when an input cannot be read, RatplusError when the inputs hold no text or
    sentencepiece rejects the corpus (e.g. too little text for the vocabulary size); nothing is written then."""
    import sentencepiece as spm

    lines = _lines(opts)
    first = next(lines, None)
    if first is None:
        raise RatplusError(f"--input {' '.join(opts.inputs)}: no text to train a tokenizer on (the documents are "
                           f"empty, or none has the field {opts.text_field!r})")
    os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines), model_prefix=opts.out[: -len(".model")],
            model_type=opts.model_type,
            vocab_size=opts.vocab_size, normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, byte_fallback=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=opts.character_coverage,
            input_sentence_size=opts.max_sentences, shuffle_input_sentence=True, max_sentence_length=1 << 14,
            num_threads=opts.num_threads, minloglevel=2,
        )
    except RuntimeError as e:
        # sentencepiece's text is "INTERNAL: src/file.cc(line) [condition] message": keep the message only
        reason = re.sub(r"^\w+: \S+\(\d+\) \[.*?\]\s*", "", str(e)).strip() or "it rejected the corpus"
        raise RatplusError(f"sentencepiece training for {opts.out} failed: {reason}") from None
    return opts.out
