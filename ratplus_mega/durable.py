"""Writes that a crash cannot leave half done: a temporary file, fsync, ``os.replace``, fsync of the folder.
Readers see the old file or the new one, never part of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_durably(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: concurrent writers never share one
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_durably(path: str | Path, obj: Any) -> None:
    write_text_durably(path, json.dumps(obj, indent=1, sort_keys=True))


def fsync_files(paths) -> None:
    """Flush each file of ``paths`` and each folder holding one (its entry) to disk."""
    paths = [Path(p) for p in paths]
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    for folder in sorted({p.parent for p in paths}):
        fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
