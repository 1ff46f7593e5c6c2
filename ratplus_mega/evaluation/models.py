"""The model under evaluation: an HF folder (or a training run, exported to a temporary folder for the
duration), its tokenizer, and the attention pattern it runs.

Patterns are spelled ``dense``, ``D:W:P`` or ``D:W:P:K:S`` (top-k block attention, docs/spec.md §4.5) and
apply to every layer and head; ``A/B[/...]`` gives each of equal consecutive groups of heads its own such
pattern, in every layer (per-head patterns, §4.4: ``dense/16:256:4`` runs half the heads dense); ``own`` is the
folder's configured pattern, which may differ per layer or head.
A pattern is applied to the loaded model in place (its config fields and each layer's pattern), so one load
serves every pattern; the model then runs exactly as a folder exported with that pattern would.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config.schema import PATTERN_KEYS, PatternConfig, pattern_fields, pattern_name
from ..errors import RatplusError

DENSE = (1, 0, 0)


@dataclass(frozen=True)
class HeadGroups:
    """Equal consecutive groups of heads, each with its own head pattern (``A/B`` on the command line)."""

    patterns: tuple[tuple, ...]


def parse_patterns(text: str) -> list[tuple | HeadGroups | None]:
    """``dense,8:16:4,dense/8:0:0,own`` → [(1, 0, 0), (8, 16, 4), HeadGroups(((1, 0, 0), (8, 0, 0))), None]: head
    patterns, head groups, None for the folder's own."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item == "own":
            out.append(None)
        elif "/" in item:
            out.append(HeadGroups(tuple(_head_pattern(part.strip(), item) for part in item.split("/"))))
        else:
            out.append(_head_pattern(item, item))
    if not out:
        raise RatplusError("--patterns: no pattern given")
    return out


def _head_pattern(text: str, item: str) -> tuple:
    if text == "dense":
        return DENSE
    try:
        values = [int(v) for v in text.split(":")]
        if len(values) not in (3, 5):
            raise ValueError
        return PatternConfig(**dict(zip(PATTERN_KEYS, values))).per_layer(1)[0]
    except (ValueError, TypeError) as e:
        detail = f" ({e})" if str(e) else ""
        raise RatplusError(f"--patterns: {item!r} is not dense, own, D:W:P, D:W:P:K:S or such patterns joined by "
                           f"/ (one per group of heads){detail}") from None


def head_group_fields(groups: HeadGroups, num_layers: int, num_heads: int) -> dict:
    """Config fields giving every layer's heads the groups' patterns, in order."""
    n = len(groups.patterns)
    if num_heads % n:
        raise RatplusError(f"--patterns: {n} groups of heads do not split the model's {num_heads} heads evenly")
    heads = [p for p in groups.patterns for _ in range(num_heads // n)]
    topk = {tuple(p[4:6]) for p in heads if len(p) > 3}
    if len(topk) > 1:
        raise RatplusError("--patterns: the top-k groups of one pattern must share the block size")
    size, score = topk.pop() if topk else (64, "max")
    per_head = {"dilation": [p[0] for p in heads], "window": [p[1] for p in heads], "sinks": [p[2] for p in heads],
                "topk_blocks": [p[3] if len(p) > 3 else 0 for p in heads]}
    return {**{key: [values] * num_layers for key, values in per_head.items()}, "block_size": size,
            "block_score": score}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    """A transformers tokenizer (encodes without BOS, as in training)."""
    folder: Path
    own: dict
    """The folder's own pattern fields."""

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def set_pattern(self, pattern: tuple | HeadGroups | None) -> str:
        """Run every layer under ``pattern`` (None: the folder's own); returns the pattern's name."""
        config = self.model.config
        if pattern is None:
            fields = self.own
        elif isinstance(pattern, HeadGroups):
            fields = head_group_fields(pattern, config.num_hidden_layers, config.num_attention_heads)
        else:
            fields = pattern_fields(pattern)
        for key in PATTERN_KEYS:
            if key in fields:
                setattr(self.model.config, key, fields[key])
        patterns = self.model.config.layer_patterns()
        for layer, p in zip(self.model.model.layers, patterns):
            layer.mixer.pattern = p
        return pattern_name(patterns)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, T, V) under the pattern set last."""
        with torch.no_grad():
            return self.model(input_ids, attention_mode="sparse").logits

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def open_model(path: str | Path, *, tokenizer: str | Path | None = None) -> Iterator[LoadedModel]:
    """The HF folder ``path``, or the newest committed checkpoint of a training run exported (fp32) to a
    temporary folder that lives as long as the context. ``tokenizer`` (a sentencepiece ``.model``) replaces
    the folder's or the run's own."""
    from transformers.utils import logging as hf_logging

    from ..inference.generate import hf_folder, load_model

    hf_logging.disable_progress_bar()  # "Loading checkpoint shards" for every pattern and folder
    with hf_folder(path, tokenizer=tokenizer) as folder:
        model, tok = load_model(folder, tokenizer=tokenizer)
        yield _loaded(model, tok, Path(path))


def _loaded(model, tok, folder: Path) -> LoadedModel:
    model = model.float().eval()
    own = {key: getattr(model.config, key) for key in PATTERN_KEYS if hasattr(model.config, key)}
    return LoadedModel(model, tok, folder, own)
