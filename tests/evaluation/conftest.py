"""A random tiny RAT+ HF folder whose sentencepiece tokenizer encodes the synthetic tasks' words as single
pieces, shared by the evaluation tests (built once per session)."""

import json
import random

import pytest


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    from ratplus_mega.data_prep.train_tokenizer import TokenizerOptions, train_tokenizer
    from ratplus_mega.evaluation.synthetic import FILLER, KEYS, VALUES

    root = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    words = KEYS + VALUES + FILLER
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(2000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n")
    return train_tokenizer(TokenizerOptions(inputs=[str(root / "corpus.jsonl")], vocab_size=512,
                                            out=str(root / "tok.model")))


@pytest.fixture(scope="session")
def random_folder(word_tokenizer, tmp_path_factory):
    """A random RAT+ model (2 layers of 64, window 128, configured pattern D=8 W=0 P=0) as an fp32 HF folder."""
    from pathlib import Path

    import torch

    from ratplus_mega.export.hf_folder import write_hf_folder
    from ratplus_mega.hf.configuration_ratplus import RatPlusConfig
    from ratplus_mega.hf.modeling_ratplus import RatPlusForCausalLM

    torch.manual_seed(0)
    config = RatPlusConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                           max_position_embeddings=128, dilation=8, window=0, sinks=0)
    out = tmp_path_factory.mktemp("random-hf") / "hf"
    return write_hf_folder(out, config, RatPlusForCausalLM(config).state_dict(), Path(word_tokenizer),
                           dtype=torch.float32)
