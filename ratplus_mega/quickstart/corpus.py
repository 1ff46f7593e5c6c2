"""The quickstart's synthetic corpus: multi-query associative recall written as words, one document per
training window, so that long-range recall is both necessary and frequent.

    cow cow ruby ruby and and and fox fox tan tan ... and fox tan cow ruby ...
    └─── fact ─────┘           └── fact ─────┘       └ queries: a key again, then its value ┘

Each document holds ``facts`` facts, one per slot of ``slot`` words at a random offset, each word of a fact
written ``repeat`` times (``key key value value`` for 2, the quickstart's default: the copies make every key
and value predictable somewhere, which a model trained on every token needs to tell them apart), filler
after them, and the last ``2 * facts * rounds`` words ask for every fact once per round
(``ratplus_mega.evaluation.synthetic`` has the layout and the words). The words become one token each under
the tokenizer the quickstart trains, so a document of ``seq_len - 1`` words plus its end-of-document token
fills one window exactly: position 0 of every window is the first word of a document. Deterministic for a
seed; no downloads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..evaluation.synthetic import FILLER, KEYS, VALUES, RecallLayout, recall_words


def write_corpus(path: str | Path, documents: int, layout: RecallLayout, *, keys=KEYS, values=VALUES,
                 filler=FILLER, seed: int = 0) -> Path:
    """``documents`` JSONL lines ``{"text": ...}`` of ``layout.length`` words each."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(documents):
            words = recall_words(layout, rng, keys=keys, values=values, filler=filler)
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path


def sample_prompt(layout: RecallLayout, *, keys=KEYS, values=VALUES, filler=FILLER, seed: int = 99
                  ) -> tuple[str, str]:
    """A fresh document cut right after its last query's key, and the value that answers it."""
    words = recall_words(layout, random.Random(seed), keys=keys, values=values, filler=filler)
    return " ".join(words[:-1]), words[-1]
