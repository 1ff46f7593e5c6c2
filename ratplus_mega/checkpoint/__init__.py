"""Checkpoints with a commit protocol, and the RNG states they carry."""

from .rng import restore_rng_state, rng_state
from .store import committed_checkpoints, latest_checkpoint, load_rank_state, read_marker, save_checkpoint

__all__ = ["committed_checkpoints", "latest_checkpoint", "load_rank_state", "read_marker", "restore_rng_state",
           "rng_state", "save_checkpoint"]
