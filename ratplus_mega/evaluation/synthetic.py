"""Synthetic retrieval at the token level: multi-query associative recall (MQAR, the quickstart's corpus) and
needle-in-a-haystack (single and multi-key), generated here from a seed, no downloads.

Every item is one token: a fact is two adjacent tokens ``key value`` (or each written twice), and asking for it
is writing ``key`` again later; the answer is the ``value`` token that follows. A sample is a row of token ids
and a boolean mask of the positions that hold an answer. A model answers a position right when its argmax
prediction at the position before is the answer token: teacher forcing, which for a one-token answer is exactly
the first token greedy decoding would produce (the decode cache reproduces the prefill's logits, docs/spec.md
§4).

Words, not ids, define the tasks: :class:`Vocabulary` maps them through a tokenizer and keeps those that are
one token, so the same tasks run on the quickstart's model (whose corpus is made of these words) and on any
model whose tokenizer encodes them as single pieces.

MQAR layout of a ``length``-token sample: fact i sits at a random offset inside its own ``slot``-token slot at
the start (its value never leaves the slot), each of its two words written ``repeat`` times (``key key value
value`` for 2), filler tokens follow, and the last ``2 * facts * rounds``
positions ask for every fact once per round, each round in its own random order, each query followed by its
answer. ``min_gap`` is the least distance from the last fact to the first query, so a local window smaller
than it never covers a fact. Only the first round's answers are scored: a later round can also be answered
from an earlier round's answers, which may lie within a local window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEYS = ("ant bat cat cow dog eel elk emu fox gnu hen jay koi owl pig ram rat yak ape asp bee boa cod doe ewe fly "
        "gar hog kid lark mole newt").split()
VALUES = ("red tan blue gold gray pink teal jade navy rose ruby sage rust mint lime plum iron salt sand snow rain "
          "wind fire ice oak elm ash fir yew bay ivy moss").split()
FILLER = "and so then now well yes but or".split()


@dataclass(frozen=True)
class Vocabulary:
    """Token ids of the keys, values and filler words (disjoint sets)."""

    keys: tuple[int, ...]
    values: tuple[int, ...]
    filler: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, encode, *, keys=KEYS, values=VALUES, filler=FILLER, min_keys: int = 8) -> "Vocabulary":
        """The words ``encode(word) -> list[int]`` turns into one token each. Raises ValueError when fewer
        than ``min_keys`` keys or values, or no filler word, are single tokens."""
        def single(words):
            ids = [encode(w) for w in words]
            return tuple(dict.fromkeys(i[0] for i in ids if len(i) == 1))

        vocab = cls(single(keys), single(values), single(filler))
        short = [name for name, got, need in (("keys", vocab.keys, min_keys), ("values", vocab.values, min_keys),
                                              ("filler words", vocab.filler, 1)) if len(got) < need]
        if short or set(vocab.keys) & set(vocab.values):
            raise ValueError(f"the tokenizer encodes too few of the synthetic tasks' {', '.join(short) or 'words'} as "
                             f"single tokens (keys {len(vocab.keys)}, values {len(vocab.values)}, filler "
                             f"{len(vocab.filler)})")
        return vocab

    @classmethod
    def of_sentencepiece(cls, model_file: str, **kwargs) -> "Vocabulary":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        return cls.from_tokenizer(lambda w: sp.encode(w), **kwargs)


@dataclass(frozen=True)
class RecallLayout:
    """Where an MQAR sample puts its facts and queries (module docstring)."""

    length: int = 127
    facts: int = 8
    slot: int = 8
    min_gap: int = 16
    rounds: int = 1
    repeat: int = 1
    """Times each word of a fact is written (2: ``key key value value``). The second copy gives every key and
    value a predictable occurrence: a language model trained on every token must then tell keys (and values)
    apart, where otherwise, each predicted only as a uniform draw from its set, their tied embeddings collapse
    onto one direction and no recall is learned (docs/decisions.md, "The quickstart's miniature replication").
    The queries are written once (``key value``)."""

    def __post_init__(self):
        if self.slot < 2 * self.repeat or self.facts < 1 or self.rounds < 1 or self.repeat < 1:
            raise ValueError(f"recall layout: need repeat >= 1, slot >= 2 * repeat, facts >= 1 and rounds >= 1, got "
                             f"slot {self.slot}, repeat {self.repeat}, facts {self.facts}, rounds {self.rounds}")
        if self.gap < self.min_gap:
            raise ValueError(f"recall layout: {self.facts} facts in slots of {self.slot} and {self.rounds} round(s) of "
                             f"queries leave a gap of {self.gap} tokens in {self.length}, less than min_gap "
                             f"{self.min_gap}")

    @property
    def gap(self) -> int:
        return self.length - self.facts * self.slot - 2 * self.facts * self.rounds

    def round_start(self, r: int) -> int:
        """Position of the first query of round ``r`` (0-based)."""
        return self.length - 2 * self.facts * (self.rounds - r)


def recall_batch(vocab: Vocabulary, layout: RecallLayout, n: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR samples: tokens (n, length) int64 and the answer mask (n, length)."""
    if layout.facts > len(vocab.keys):
        raise ValueError(f"recall: {layout.facts} facts need as many distinct keys, the vocabulary has "
                         f"{len(vocab.keys)}")
    keys_t, values_t, filler_t = (torch.tensor(v) for v in (vocab.keys, vocab.values, vocab.filler))
    f = layout.facts
    tokens = filler_t[torch.randint(len(filler_t), (n, layout.length), generator=generator)]
    keys = keys_t[torch.argsort(torch.rand(n, len(keys_t), generator=generator), dim=1)[:, :f]]
    values = values_t[torch.randint(len(values_t), (n, f), generator=generator)]
    offsets = torch.randint(layout.slot - 2 * layout.repeat + 1, (n, f), generator=generator)
    rows = torch.arange(n)[:, None]
    at = torch.arange(f)[None, :] * layout.slot + offsets
    for c in range(layout.repeat):
        tokens[rows, at + c], tokens[rows, at + layout.repeat + c] = keys, values
    answers = torch.zeros(n, layout.length, dtype=torch.bool)
    for r in range(layout.rounds):
        order = torch.argsort(torch.rand(n, f, generator=generator), dim=1)
        ask = layout.round_start(r) + 2 * torch.arange(f)[None, :].expand(n, f)
        tokens[rows, ask], tokens[rows, ask + 1] = keys.gather(1, order), values.gather(1, order)
        if r == 0:
            answers[rows, ask + 1] = True
    return tokens, answers


def recall_words(layout: RecallLayout, rng, *, keys=KEYS, values=VALUES, filler=FILLER) -> list[str]:
    """One MQAR sample as words (for writing a text corpus): the layout of :func:`recall_batch`, drawn with
    ``rng`` (a ``random.Random``)."""
    words = [rng.choice(filler) for _ in range(layout.length)]
    facts = rng.sample(list(keys), layout.facts)
    answer = {}
    for i, key in enumerate(facts):
        at = i * layout.slot + rng.randrange(layout.slot - 2 * layout.repeat + 1)
        answer[key] = rng.choice(values)
        for c in range(layout.repeat):
            words[at + c], words[at + layout.repeat + c] = key, answer[key]
    for r in range(layout.rounds):
        start = layout.round_start(r)
        for i, key in enumerate(rng.sample(facts, len(facts))):
            words[start + 2 * i], words[start + 2 * i + 1] = key, answer[key]
    return words


@dataclass(frozen=True)
class NeedleCell:
    """One cell of the NIAH grid: samples of ``length`` tokens whose queried needle starts at ``depth``
    (0 = the first position, 1 = right before the query), among ``needles`` needles."""

    length: int
    depth: float
    needles: int


def niah_batch(vocab: Vocabulary, cell: NeedleCell, n: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` needle-in-a-haystack samples (RULER's single and multi-key retrieval, in this vocabulary): a
    haystack of filler tokens, ``needles`` facts ``key value`` with distinct keys (the queried one at
    ``depth``, the others at random non-overlapping places), and the queried key as the second-to-last token,
    its value last. Returns tokens (n, length) and the answer mask (only the last position)."""
    length, k = cell.length, cell.needles
    room = length - 2  # the query and its answer at the end
    if 2 * k > room or k > len(vocab.keys):
        raise ValueError(f"niah: {k} needles do not fit {length} tokens (or the {len(vocab.keys)} keys)")
    keys_t, values_t, filler_t = (torch.tensor(v) for v in (vocab.keys, vocab.values, vocab.filler))
    tokens = filler_t[torch.randint(len(filler_t), (n, length), generator=generator)]
    answers = torch.zeros(n, length, dtype=torch.bool)
    answers[:, -1] = True
    slots = room // 2  # needles occupy aligned pairs of positions, so they never overlap
    target = min(int(round(cell.depth * (slots - 1))), slots - 1)
    for row in range(n):
        keys = keys_t[torch.randperm(len(keys_t), generator=generator)[:k]]
        values = values_t[torch.randint(len(values_t), (k,), generator=generator)]
        others = [s for s in torch.randperm(slots, generator=generator).tolist() if s != target][:k - 1]
        for slot, key, value in zip([target] + others, keys, values):
            tokens[row, 2 * slot], tokens[row, 2 * slot + 1] = key, value
        tokens[row, -2], tokens[row, -1] = keys[0], values[0]
    return tokens, answers


@torch.no_grad()
def answer_hits(logits_fn, tokens: torch.Tensor, answers: torch.Tensor, batch_size: int = 64
                ) -> tuple[int, int]:
    """(answers predicted right, answers) of ``logits_fn(tokens) -> (B, T, V)`` logits: the argmax at the
    position before each answer must be the answer token."""
    hits = total = 0
    for start in range(0, tokens.shape[0], batch_size):
        x, mask = tokens[start:start + batch_size], answers[start:start + batch_size]
        guess = logits_fn(x)[:, :-1].argmax(-1)
        target, where = x[:, 1:], mask[:, 1:]
        hits += int((guess[where] == target[where]).sum())
        total += int(where.sum())
    return hits, total
