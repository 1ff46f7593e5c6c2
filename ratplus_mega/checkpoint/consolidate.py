"""A committed checkpoint's weights as one fp32 reference-layout state dict, for any TP/PP layout and ZeRO 0–3.

Each tensor x pipeline rank's fp32 weights are consolidated over its ZeRO partitions with DeepSpeed's
``zero_to_fp32`` (run on that rank's files alone: it knows nothing of TP/PP), then the TP pieces and the
pipeline stages are joined through ``reference_layout.py``, the table the training model is sharded by.
This module and ``relayout.py`` (which also reads the optimizer state) are the only ones that know
DeepSpeed's file names. The checkpoint's files are verified first (present, of the size and SHA-256 recorded
when they were written, holding only allow-listed classes) and then loaded weights-only, ``zero_to_fp32``'s
loads included (``trust.py``).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch

from ..config.schema import RunConfig
from ..errors import RatplusError
from ..reference_layout import unshard_pieces
from .integrity import problem_line, verify_checkpoint
from .marker import read_marker, run_config
from .trust import restricted_loads, safe_load


def consolidate(checkpoint: Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The run config and the fp32 reference-layout state dict (``lm_head.weight`` tied) of ``checkpoint``.

    Raises RatplusError (one line, naming the file) if a file is missing, truncated or altered, or names a
    class outside the allow-list; nothing is loaded then."""
    check = verify_checkpoint(checkpoint)
    if check.problems:
        raise RatplusError(problem_line(checkpoint, check.problems))
    layout = read_marker(checkpoint).layout
    run = run_config(checkpoint)
    tp, pp = layout["tp"], layout["pp"]
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for mp_rank in range(tp * pp):
        tp_rank = mp_rank % tp  # megatron orders a model-parallel group tensor-parallel first
        with restricted_loads(check.globals_found):
            weights = _rank_weights(checkpoint, mp_rank)
        for name, tensor in weights.items():
            if name != "output_weight":  # the last stage's copy of the tied embedding
                pieces.setdefault(name, {})[tp_rank] = tensor.float()
    state = unshard_pieces(run.model, tp, {name: [p[r] for r in range(tp)] for name, p in pieces.items()})
    return run, state


def _rank_weights(checkpoint: Path, mp_rank: int) -> dict[str, torch.Tensor]:
    # ZeRO 0-2 write mp_rank_XX_model_states.pt; ZeRO-3 one zero_pp_rank_N_mp_rank_XX_model_states.pt per DP rank
    model_files = sorted(checkpoint.glob(f"*mp_rank_{mp_rank:02d}_model_states.pt"))
    if not model_files:
        raise ValueError(f"{checkpoint}: no model states of tensor x pipeline rank {mp_rank} (incomplete checkpoint)")
    optim_files = sorted(checkpoint.glob(f"*_mp_rank_{mp_rank:02d}_optim_states.pt"))
    if not optim_files:  # ZeRO-0 without a separate optimizer file: the module holds the weights
        return safe_load(model_files[0])["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # this rank's files alone, where zero_to_fp32 looks
        view = Path(tmp) / "tag"
        view.mkdir()
        for file in (*model_files, *optim_files):
            (view / file.name).symlink_to(file.resolve())
        with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 narrates every file
            return dict(get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag"))
