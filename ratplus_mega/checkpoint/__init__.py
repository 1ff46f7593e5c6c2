"""Checkpoints: the commit protocol, the marker that says what a checkpoint holds and what its files' sizes and
digests are, the allow-list of what a loaded file may hold, consolidation of its shards to full tensors, the
re-cut of its weights and optimizer state for a run of another layout, and the RNG states a resumed run
continues from. Training, adaptation and export use this package and never read a checkpoint's files
themselves."""

from .consolidate import consolidate
from .marker import MARKER, Marker, check_resumable, check_same_model_layout, model_fingerprint, read_marker, run_config
from .rng import restore_rng_state, rng_state
from .store import (CheckpointReport, checkpoint_bytes, committed_checkpoints, latest_checkpoint, load_module_weights,
                    load_rank_state, new_run_id, resolve_checkpoint, resume_checkpoint, save_checkpoint,
                    select_resume_checkpoint, set_aside, step_of, verify_checkpoints)
from .trust import ALLOWED_GLOBALS

__all__ = ["ALLOWED_GLOBALS", "CheckpointReport", "MARKER", "Marker", "check_resumable", "check_same_model_layout",
           "checkpoint_bytes", "committed_checkpoints", "consolidate", "latest_checkpoint", "load_module_weights",
           "load_rank_state", "model_fingerprint", "new_run_id", "read_marker", "resolve_checkpoint",
           "restore_rng_state", "resume_checkpoint", "rng_state", "run_config", "save_checkpoint",
           "select_resume_checkpoint", "set_aside", "step_of", "verify_checkpoints"]
