"""Checkpoint import and export: public RAT+ checkpoints in, HuggingFace folders out."""

from .hf_folder import AUTO_MAP, write_hf_folder
from .import_public import convert_public_state_dict, load_public_checkpoint, public_to_hf

__all__ = ["AUTO_MAP", "convert_public_state_dict", "load_public_checkpoint", "public_to_hf", "write_hf_folder"]
