"""``ratplus export-hf``: a committed training checkpoint (any TP/PP layout, ZeRO 0–3) → an HF folder.

``checkpoint.consolidate`` turns the checkpoint into full fp32 reference-layout tensors; this module picks
the pattern, dtype and tokenizer and writes the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import consolidate, resolve_checkpoint
from ..config.schema import pattern_fields
from ..reference_layout import reference_config
from .hf_folder import write_hf_folder


def export_hf(checkpoint: str | Path, out: str | Path, *, pattern: tuple[int, int, int] | None = None,
              dtype: torch.dtype = torch.bfloat16, tokenizer: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write the HF folder ``out`` for a training checkpoint; ``pattern`` (D, W, P) replaces the configured
    sparse pattern in every layer, ``tokenizer`` defaults to the run's ``data.tokenizer``."""
    run, state = consolidate(resolve_checkpoint(checkpoint, key="--checkpoint"))
    overrides = pattern_fields(pattern) if pattern else {}
    tokenizer = tokenizer or run.data.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ValueError(f"tokenizer {tokenizer} not found: pass --tokenizer PATH.model")
    return write_hf_folder(out, reference_config(run.model, **overrides), state,
                           Path(tokenizer) if tokenizer else None, dtype=dtype, overwrite=overwrite)
