"""A synthetic corpus in which long-range recall matters: key → value facts stated at the start of a
document are asked for after filler text, so a model must carry them across the window.

    Record 12. The code of river is 417. The code of stone is 92. ... <filler sentences> ...
    Question: the code of stone? Answer: 92.

Deterministic for a seed; no downloads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

KEYS = ("river stone bird cloud city road tree light song lamp door field hill ship wheel bell coin "
        "leaf star wolf").split()
SUBJECTS = "the old farmer|a small child|the tall guard|my neighbour|the quiet baker|a young sailor".split("|")
VERBS = "carries|finds|watches|paints|follows|remembers|builds|cleans".split("|")
OBJECTS = "a red basket|the long bridge|an empty cart|the green gate|a heavy box|the narrow path".split("|")
PLACES = "near the market|under the old tower|after the rain|before the winter|along the shore".split("|")


@dataclass(frozen=True)
class RecallQuestion:
    prompt: str
    """Document text up to and including "Answer:"."""
    answer: str


def make_document(rng: random.Random, index: int, *, facts: int = 3,
                  filler: int = 6) -> tuple[str, list[RecallQuestion]]:
    keys = rng.sample(KEYS, facts)
    values = {k: str(rng.randint(10, 999)) for k in keys}
    text = f"Record {index}. " + " ".join(f"The code of {k} is {values[k]}." for k in keys) + " "
    text += " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                     f"{rng.choice(PLACES)}." for _ in range(filler))
    questions = []
    for k in rng.sample(keys, 2):
        prefix = f"{text} Question: the code of {k}? Answer:"
        questions.append(RecallQuestion(prompt=prefix, answer=f" {values[k]}"))
        text = f"{prefix} {values[k]}."
    return text, questions


def write_corpus(path: str | Path, documents: int, *, seed: int = 0) -> Path:
    """``documents`` JSONL lines ``{"text": ...}``."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(documents):
            f.write(json.dumps({"text": make_document(rng, i)[0]}) + "\n")
    return path


def recall_questions(count: int, *, seed: int) -> list[RecallQuestion]:
    """Questions from fresh documents (another seed than the training corpus)."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        out += make_document(rng, len(out))[1]
    return out[:count]
