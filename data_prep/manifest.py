"""``manifest.json`` of a ``prep shards`` output folder: what was written, from what, with which tokenizer.

Layout of an output folder ``DIR``::

    DIR/manifest.json          this file (``complete`` is false while the job runs)
    DIR/train/index.json       merged MDS index over DIR/train/<part>/ (one part per input)
    DIR/val/index.json         same for the validation split
    DIR/.progress/             per-input commit markers and the carried window tail (resumption)
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["MANIFEST_NAME", "FORMAT_VERSION", "SPLITS", "read_manifest",
           "manifest_path_for", "check_manifest"]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")


def read_manifest(path: str) -> dict[str, Any]:
    """Load a manifest; raises ValueError naming the file if it is not one."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the data manifest ({e})") from None
    if not isinstance(obj, dict) or obj.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a ratplus data manifest (format_version {FORMAT_VERSION} expected)")
    return obj


def manifest_path_for(split_folder: str) -> str:
    """``DIR/manifest.json`` for a split folder ``DIR/train`` or ``DIR/val``."""
    return os.path.join(os.path.dirname(os.path.abspath(split_folder.rstrip("/"))), MANIFEST_NAME)


def check_manifest(split_folder: str, *, seq_len: int, vocab_size: int) -> dict[str, Any]:
    """Check that the shards under a local ``split_folder`` were written for this model.

    Raises ValueError naming the manifest path and both values when the manifest is missing, incomplete,
    or its ``seq_len`` or ``vocab_size`` differ from the model's."""
    path = manifest_path_for(split_folder)
    if not os.path.isfile(path):
        raise ValueError(f"{split_folder}: no {MANIFEST_NAME} beside it at {path}; write the shards with "
                         "`ratplus prep shards`")
    manifest = read_manifest(path)
    if not manifest.get("complete"):
        raise ValueError(f"{path}: the prep job that writes these shards has not finished; re-run it")
    if manifest["seq_len"] != seq_len:
        raise ValueError(f"{path}: shards hold windows for seq_len {manifest['seq_len']} but the model's seq_len is "
                         f"{seq_len}; re-run `ratplus prep shards --seq-len {seq_len}` or fix model.seq_len")
    if manifest["vocab_size"] != vocab_size:
        raise ValueError(f"{path}: shards were tokenized with a vocabulary of {manifest['vocab_size']} but the "
                         f"model's vocab_size is {vocab_size}; use the matching tokenizer or fix model.vocab_size")
    return manifest
