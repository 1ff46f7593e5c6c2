"""Fixtures of the data_prep tests: a small lossless tokenizer trained by ``ratplus prep tokenizer``."""

from __future__ import annotations

import random

import pytest

from tests.data.data_helpers import make_docs


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> str:
    """A 400-piece BPE model trained by ``ratplus prep tokenizer`` on generated text."""
    from ratplus_mega.cli import main

    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = [" ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(2, 7))) for _ in range(12))
             for _ in range(3000)]
    (root / "corpus.txt").write_text("\n".join(make_docs(3000, seed=123) + words), encoding="utf-8")
    out = root / "tok.model"
    assert main(["prep", "tokenizer", "--input", str(root / "corpus.txt"), "--vocab-size", "400",
                 "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="session")
def sp(tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer)
