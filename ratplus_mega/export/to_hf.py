"""``ratplus export-hf``: a committed training checkpoint (any TP/PP layout, ZeRO 0–3) → an HF folder.

Each tensor x pipeline rank's fp32 weights are consolidated over its ZeRO partitions with DeepSpeed's
``zero_to_fp32`` (run on that rank's files alone: it knows nothing of TP/PP), then the TP pieces and the
pipeline stages are joined through ``model/mapping.py``, the same table the training model is sharded by.
DeepSpeed's files are unpickled in full by DeepSpeed: export only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch

from ..checkpoint import latest_checkpoint, read_marker
from ..checkpoint.store import MARKER
from ..config.load import load_config
from ..config.schema import ModelConfig
from ..model.mapping import reference_config, unshard_pieces
from .hf_folder import write_hf_folder


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed checkpoint folder, or the newest one under a run's ``checkpoints`` folder or run folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / MARKER).is_file():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ValueError(f"--checkpoint {path}: no committed checkpoint there (a folder holding {MARKER}, or a run's "
                     "checkpoints folder)")


def consolidate(checkpoint: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and the fp32 reference-layout state dict of a committed checkpoint."""
    layout = read_marker(checkpoint)["layout"]
    cfg = load_config(checkpoint / "config.yaml")
    tp, pp = layout["tp"], layout["pp"]
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for mp_rank in range(tp * pp):
        tp_rank = mp_rank % tp  # megatron orders a model-parallel group tensor-parallel first
        for name, tensor in _rank_weights(checkpoint, mp_rank).items():
            if name != "output_weight":  # the last stage's copy of the tied embedding
                pieces.setdefault(name, {})[tp_rank] = tensor.float()
    return cfg.model, unshard_pieces(cfg.model, tp, {name: [p[r] for r in range(tp)] for name, p in pieces.items()})


def _rank_weights(checkpoint: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    # ZeRO 0-2 write mp_rank_XX_model_states.pt; ZeRO-3 one zero_pp_rank_N_mp_rank_XX_model_states.pt per DP rank
    model_files = sorted(checkpoint.glob(f"*mp_rank_{mp_rank:02d}_model_states.pt"))
    if not model_files:
        raise ValueError(f"{checkpoint}: no model states of tensor x pipeline rank {mp_rank} (incomplete checkpoint)")
    optim_files = sorted(checkpoint.glob(f"*_mp_rank_{mp_rank:02d}_optim_states.pt"))
    if not optim_files:  # ZeRO-0 without a separate optimizer file: the module holds the weights
        return torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # this rank's files alone, where zero_to_fp32 looks
        view = Path(tmp) / "tag"
        view.mkdir()
        for file in (*model_files, *optim_files):
            (view / file.name).symlink_to(file.resolve())
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every file
            return dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag"))


def export_hf(checkpoint: str | Path, out: str | Path, *, pattern: tuple[int, int, int] | None = None,
              dtype: torch.dtype = torch.bfloat16, tokenizer: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write the HF folder ``out`` for a training checkpoint; ``pattern`` (D, W, P) replaces the configured
    sparse pattern in every layer, ``tokenizer`` defaults to the run's ``data.tokenizer``."""
    path = resolve_checkpoint(checkpoint)
    model, state = consolidate(path)
    overrides = dict(zip(("dilation", "window", "sinks"), pattern)) if pattern else {}
    tokenizer = tokenizer or load_config(path / "config.yaml").data.tokenizer
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise ValueError(f"tokenizer {tokenizer} not found: pass --tokenizer PATH.model")
    return write_hf_folder(out, reference_config(model, **overrides), state,
                           Path(tokenizer) if tokenizer else None, dtype=dtype, overwrite=overwrite)
