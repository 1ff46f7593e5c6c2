"""Silence the known messages that libraries under the stack print when they are imported, so that every
command's console shows only what concerns the user.

Exactly these, matched by their text, nothing else (a user's own warnings and every other library message
still show):

- megatron-core's ``UserWarning`` "Transformer Engine and Apex are not installed. Falling back to ...", once
  per module that has a fused fallback (four on every training command without Transformer Engine);
- torch's log record "No CUDA runtime is found, using CUDA_HOME=..." (``torch.utils.cpp_extension``, imported
  by DeepSpeed and megatron-core) on a machine with a CUDA toolkit but no GPU.

Installed when the package is imported, before any of those libraries is.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["KNOWN_LOG_RECORDS", "KNOWN_WARNINGS", "silence_known_import_messages"]

KNOWN_WARNINGS = (r"Transformer Engine and Apex are not installed\. Falling back",)
"""Regular expressions matched against the start of a ``UserWarning``'s text."""

KNOWN_LOG_RECORDS = (("torch.utils.cpp_extension", "No CUDA runtime is found"),)
"""(logger name, start of the message) of log records that are dropped."""


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_known_import_messages() -> None:
    """Install the filters (idempotent)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for name, prefix in KNOWN_LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRecords) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropRecords(prefix))
