"""The synthetic tasks score what they claim: a hand-built model that looks every answer up scores 100 %, a
random model scores near chance, and the samples have the promised layout."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ratplus_mega.evaluation.models import LoadedModel
from ratplus_mega.evaluation.run import EvalOptions, niah_grid, recall_accuracy
from ratplus_mega.evaluation.synthetic import (FILLER, KEYS, VALUES, NeedleCell, RecallLayout, Vocabulary,
                                               niah_batch, recall_batch, recall_words)

WORDS = ["<unk>", "<s>", "</s>", *KEYS, *VALUES, *FILLER]


class WordTokenizer:
    """One id per word of the synthetic tasks."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [WORDS.index(w) for w in text.split()]}


class LookUp(torch.nn.Module):
    """The hand-built model: at each position, the token that followed the latest earlier occurrence of the
    current token gets all the probability (an induction head, written out)."""

    config = SimpleNamespace(max_position_embeddings=128)

    def forward(self, input_ids, attention_mode="sparse"):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, len(WORDS))
        same = (input_ids[:, :, None] == input_ids[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril(-1)
        latest = torch.where(same.any(-1), (same * torch.arange(t)).argmax(-1), -1)  # (b, t)
        for i, j in zip(*torch.nonzero(latest >= 0, as_tuple=True)):
            logits[i, j, input_ids[i, latest[i, j] + 1]] = 1.0
        return SimpleNamespace(logits=logits)


class Random(torch.nn.Module):
    config = SimpleNamespace(max_position_embeddings=128)

    def forward(self, input_ids, attention_mode="sparse"):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        return SimpleNamespace(logits=torch.randn(*input_ids.shape, len(WORDS), generator=g))


def _loaded(model):
    return LoadedModel(model, WordTokenizer(), Path("hand-built"), {})


OPTIONS = EvalOptions(model="hand-built", recall_samples=64, niah_lengths=[32, 128], niah_depths=[0.0, 0.5, 1.0],
                      niah_samples=8)


def test_a_model_that_looks_answers_up_scores_every_answer():
    assert recall_accuracy(_loaded(LookUp()), OPTIONS) == {"recall": 1.0, "answers": 64 * 8}
    rows = niah_grid(_loaded(LookUp()), OPTIONS)
    assert {(r["variant"], r["length"], r["depth"]) for r in rows} == {
        (v, n, d) for v in ("single", "multikey") for n in (32, 128) for d in (0.0, 0.5, 1.0)}
    assert all(r["recall"] == 1.0 and r["samples"] == 8 for r in rows)


def test_a_random_model_scores_near_chance():
    assert recall_accuracy(_loaded(Random()), OPTIONS)["recall"] < 0.05
    assert max(r["recall"] for r in niah_grid(_loaded(Random()), OPTIONS)) <= 0.25  # 8 samples a cell


def test_recall_samples_keep_facts_out_of_the_window_of_their_queries():
    vocab = Vocabulary.from_tokenizer(lambda w: WordTokenizer()(w)["input_ids"])
    layout = RecallLayout(length=127, facts=8, slot=8, min_gap=16)
    tokens, answers = recall_batch(vocab, layout, 32, torch.Generator().manual_seed(0))
    assert tokens.shape == answers.shape == (32, 127) and answers.sum(1).eq(8).all()
    keys = torch.tensor(vocab.keys)
    for row, mask in zip(tokens, answers):
        asked = torch.nonzero(mask).flatten() - 1
        for q in asked:
            [fact] = [p for p in range(q) if row[p] == row[q]]
            assert row[fact + 1] == row[q + 1] and q - fact > 16 and fact // 8 == (fact + 1) // 8
        assert torch.isin(row[:64], keys).sum() == 8  # one fact per slot
    with pytest.raises(ValueError, match="gap"):
        RecallLayout(length=64, facts=8, slot=8)
    words = recall_words(layout, __import__("random").Random(0))
    assert len(words) == 127 and sum(w in KEYS for w in words) == 16


def test_niah_puts_the_asked_needle_at_its_depth():
    vocab = Vocabulary.from_tokenizer(lambda w: WordTokenizer()(w)["input_ids"])
    for depth, at in ((0.0, 0), (1.0, 60)):
        tokens, answers = niah_batch(vocab, NeedleCell(64, depth, 3), 4, torch.Generator().manual_seed(1))
        assert answers[:, -1].all() and answers.sum() == 4
        assert (tokens[:, at] == tokens[:, -2]).all() and (tokens[:, at + 1] == tokens[:, -1]).all()
        assert torch.isin(tokens[:, :-2], torch.tensor(vocab.keys)).sum(1).eq(3).all()


def test_recall_samples_with_repeated_facts_and_rounds_of_queries():
    """The quickstart's layout: each word of a fact written twice (``key key value value``) inside its slot,
    two rounds of single ``key value`` queries, only the first scored; looking answers up still scores all."""
    vocab = Vocabulary.from_tokenizer(lambda w: WordTokenizer()(w)["input_ids"])
    layout = RecallLayout(length=127, facts=8, slot=8, rounds=2, repeat=2)
    tokens, answers = recall_batch(vocab, layout, 32, torch.Generator().manual_seed(0))
    assert answers.sum(1).eq(8).all() and not answers[:, layout.round_start(1):].any()
    for row in tokens:
        for slot in range(8):
            words = row[8 * slot:8 * slot + 8].tolist()
            at = next(i for i, w in enumerate(words) if w in vocab.keys)
            assert words[at] == words[at + 1] and words[at + 2] == words[at + 3] and words[at + 2] in vocab.values
        for start in (layout.round_start(0), layout.round_start(1)):
            assert set(row[start:start + 16:2].tolist()) == set(row[:64][torch.isin(row[:64], torch.tensor(
                vocab.keys))].tolist())
    options = EvalOptions(model="hand-built", recall_samples=64, recall_rounds=2, recall_repeat=2)
    assert recall_accuracy(_loaded(LookUp()), options) == {"recall": 1.0, "answers": 64 * 8}
    words = recall_words(layout, __import__("random").Random(0))
    assert len(words) == 127 and sum(w in KEYS for w in words) == 8 * 2 + 8 * 2
    with pytest.raises(ValueError, match="repeat"):
        RecallLayout(slot=3, repeat=2)
