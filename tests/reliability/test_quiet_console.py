"""A quiet console: the import-time messages of the libraries under the stack (megatron-core's "Transformer
Engine and Apex are not installed" four times, torch's "No CUDA runtime is found", DeepSpeed's "Setting
accelerator to CPU" where torch sees no GPU either) no longer print on every command; a user's own warnings,
and other messages of the same libraries, still do."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO

KNOWN = ("Transformer Engine and Apex are not installed", "No CUDA runtime is found",
         "Setting accelerator to CPU")


def test_a_training_run_prints_no_library_noise(tiny_run):
    stderr = (tiny_run.parent / "train.stderr").read_text()
    assert not any(message in stderr for message in KNOWN), stderr
    assert "warn" not in stderr.lower(), stderr


def test_only_the_known_messages_are_silenced():
    code = """
import logging, warnings
import ratplus_mega.model, ratplus_mega.train.loop  # megatron-core, DeepSpeed, torch.utils.cpp_extension
from deepspeed.accelerator import get_accelerator
import torch
get_accelerator()
warnings.warn("mine: a user's own warning")
warnings.warn("Transformer Engine is mentioned here, in another message", UserWarning)
logging.getLogger("torch.utils.cpp_extension").warning("another message of cpp_extension")
if not torch.cuda.is_available():
    logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. (logged again)")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
                               "OMP_NUM_THREADS": "1", "RATPLUS_DISABLE_KERNELS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any(message in proc.stderr for message in KNOWN), proc.stderr
    for shown in ("mine: a user's own warning", "Transformer Engine is mentioned here",
                  "another message of cpp_extension"):
        assert shown in proc.stderr, proc.stderr
