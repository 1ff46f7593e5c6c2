"""A small synthetic corpus, its tokenizer and MDS shards, shared by the end-to-end training tests."""

import random

import pytest

WORDS = ("the a one every small large red blue river stone bird cloud city road tree light song "
         "runs sees keeps holds finds makes opens near under over after before quickly slowly").split()


def write_corpus(path, documents: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for d in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        lines.append(f'{{"text": "Document {d}. {" ".join(sentences)}"}}')
    path.write_text("\n".join(lines) + "\n")


def _prepare(root, corpus, documents_per_line: bool, tokenizer_corpus=None):
    from ratplus_mega.data_prep.to_mds import PrepOptions, prep_shards
    from ratplus_mega.data_prep.train_tokenizer import TokenizerOptions, train_tokenizer

    tokenizer = train_tokenizer(TokenizerOptions(inputs=[str(tokenizer_corpus or corpus)], vocab_size=512,
                                                 out=str(root / "tok.model"), model_type="bpe", text_field="text",
                                                 txt_blocks=False))
    prep_shards(PrepOptions(inputs=[str(corpus)], tokenizer=str(tokenizer), out=str(root / "shards"), seq_len=128,
                            text_field="text", val_fraction=0.05 if documents_per_line else 0.0, seed=0, workers=1,
                            strict=False, txt_blocks=False))
    return root / "shards"


@pytest.fixture(scope="session")
def single_document_shards(tmp_path_factory):
    """One long document: every window but the last has 128 predicted tokens (no EOS inside), so the
    recipe's mean of micro-batch token means does not depend on how samples group into micro-batches."""
    root = tmp_path_factory.mktemp("one-doc")
    corpus = root / "corpus.txt"
    write_corpus(root / "lines.jsonl", 600, seed=1)
    corpus.write_text(" ".join(line[10:-2] for line in (root / "lines.jsonl").read_text().splitlines()))
    return _prepare(root, corpus, documents_per_line=False, tokenizer_corpus=root / "lines.jsonl")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """``prep tokenizer`` (vocab 512, the tiny preset's) and ``prep shards`` at seq_len 128; returns the folder."""
    root = tmp_path_factory.mktemp("tiny-data")
    corpus = root / "corpus.jsonl"
    write_corpus(corpus, 1500)
    return _prepare(root, corpus, documents_per_line=True)
