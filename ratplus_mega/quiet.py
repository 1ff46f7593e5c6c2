"""Silence the known messages that libraries under the stack print when they are imported, so that every
command's console shows only what concerns the user.

Exactly these, matched by their text, nothing else (a user's own warnings and every other library message
still show):

- megatron-core's ``UserWarning`` "Transformer Engine and Apex are not installed. Falling back to ...", once
  per module that has a fused fallback (four on every training command without Transformer Engine);
- torch's log record "No CUDA runtime is found, using CUDA_HOME=..." (``torch.utils.cpp_extension``, imported
  by DeepSpeed and megatron-core) on a machine with a CUDA toolkit but no GPU;
- DeepSpeed's log record "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to
  detect it." when torch sees no CUDA device either (there is nothing to detect); on a machine where torch
  does see one, the message means something and shows.

Installed when the package is imported, before any of those libraries is.
"""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["KNOWN_LOG_RECORDS", "KNOWN_WARNINGS", "silence_known_import_messages"]

KNOWN_WARNINGS = (r"Transformer Engine and Apex are not installed\. Falling back",)
"""Regular expressions matched against the start of a ``UserWarning``'s text."""


def _no_cuda_device() -> bool:
    torch = sys.modules.get("torch")  # DeepSpeed has imported it by the time it logs
    return torch is not None and not torch.cuda.is_available()


KNOWN_LOG_RECORDS = (
    ("torch.utils.cpp_extension", "No CUDA runtime is found", None),
    ("DeepSpeed", "Setting accelerator to CPU.", _no_cuda_device),
)
"""(logger name, start of the message, condition or None) of the log records that are dropped."""


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str, condition):
        super().__init__()
        self.prefix, self.condition = prefix, condition

    def filter(self, record: logging.LogRecord) -> bool:
        known = str(record.msg).startswith(self.prefix)
        return not (known and (self.condition is None or self.condition()))


def silence_known_import_messages() -> None:
    """Install the filters (idempotent)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name, prefix, condition in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix, condition))
