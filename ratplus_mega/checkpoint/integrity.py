"""Each checkpoint file's size and SHA-256, recorded while it is written, and the check of a folder against them.

Every file of a checkpoint is written through :class:`_HashingFile`, which hashes the bytes on their way to
disk (no second read): DeepSpeed's through the checkpoint engine :func:`install_recording_engine` puts in place of
DeepSpeed's ``TorchCheckpointEngine``; ours through :func:`save_recorded` and :func:`write_text_recorded`. The
marker (``COMMITTED.json``) lists them all. :func:`check_files` reads a checkpoint's files back, compares size
and digest, and scans each ``torch.save`` file's pickle against the allow-list (``trust.py``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .marker import MARKER, Marker, read_marker
from .trust import FileRefused, UnreadableFile, safe_load, unlisted_globals

__all__ = ["FileCheck", "FileProblem", "check_files", "install_recording_engine", "listed_files", "problem_line",
           "save_recorded", "verify_checkpoint", "write_text_recorded"]

_CHUNK = 16 << 20


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it (``torch.save`` writes it front to back)."""

    def __init__(self, f):
        self._f, self._hash, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._f.write(view)
        self.size += len(view)
        return len(view)

    def record(self) -> dict:
        return {"size": self.size, "sha256": self._hash.hexdigest()}


def save_recorded(obj, path: str | Path) -> dict:
    """``torch.save(obj, path)``; returns the file's ``{"size", "sha256"}``."""
    with open(path, "wb") as f:
        out = _HashingFile(f)
        torch.save(obj, out)
    return out.record()


def write_text_recorded(path: str | Path, text: str) -> dict:
    """Write ``text`` to ``path`` and fsync it; returns the file's ``{"size", "sha256"}``."""
    with open(path, "wb") as f:
        out = _HashingFile(f)
        out.write(text.encode())
        f.flush()
        os.fsync(f.fileno())
    return out.record()


def install_recording_engine(engine):
    """The DeepSpeed ``engine``'s checkpoint engine, replaced (once) by one whose ``save`` records each file's
    size and digest in its ``written`` (absolute path -> record) and whose ``load`` is weights-only with the
    allow-list (``trust.safe_load``)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    recording = _recording_engine_class()
    current = engine.checkpoint_engine
    if isinstance(current, recording):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed's checkpoint engine is {type(current).__name__}; checkpoints are written "
                           "only through the default TorchCheckpointEngine (no checkpoint.writer or datastates "
                           "in the DeepSpeed config)")
    engine.checkpoint_engine = recording()
    return engine.checkpoint_engine


@functools.cache
def _recording_engine_class():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class RecordingCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(None)
            self.name = "RatplusRecordingCheckpointEngine"
            self.zipfile_serialization = True
            self.written: dict[str, dict] = {}

        def save(self, state_dict, path: str):
            self.written[os.path.abspath(path)] = save_recorded(state_dict, path)

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    return RecordingCheckpointEngine


@dataclass(frozen=True)
class FileProblem:
    path: Path
    """The file (or, for a marker that cannot be read, ``COMMITTED.json``)."""
    refused: bool
    """True: it names a class or function outside the allow-list (never to be loaded); False: it is missing,
    truncated, altered or unreadable."""
    detail: str

    def line(self) -> str:
        return f"{self.path} {self.detail}"


@dataclass
class FileCheck:
    problems: list[FileProblem] = field(default_factory=list)
    globals_found: set[str] = field(default_factory=set)
    """The allow-listed classes the files hold (what their loading must admit)."""


def check_files(folder: Path, files: dict[str, dict | None]) -> FileCheck:
    """Check ``files`` (name relative to ``folder`` -> recorded ``{"size", "sha256"}``, or None where nothing
    was recorded): present, of the recorded size and digest, and each ``.pt`` file's pickle holding only
    allow-listed classes. A refusal is reported even when the file is also altered."""
    result = FileCheck()
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            result.problems.append(FileProblem(path, False, "is missing"))
            continue
        damage = None
        if name.endswith(".pt"):
            try:
                found, unlisted = unlisted_globals(path)
            except FileRefused as e:
                result.problems.append(FileProblem(path, True, f"holds {', '.join(e.names)}"))
                continue
            except UnreadableFile as e:
                damage = e.reason
            else:
                if unlisted:
                    result.problems.append(FileProblem(path, True, f"holds {', '.join(unlisted)}"))
                    continue
                result.globals_found.update(found)
        damage = (_compare(path, expected) if expected else None) or damage
        if damage:
            result.problems.append(FileProblem(path, False, damage))
    result.problems.sort(key=lambda p: (not p.refused, str(p.path)))
    return result


def _compare(path: Path, expected: dict) -> str | None:
    size = path.stat().st_size
    if size < expected["size"]:
        return f"is truncated ({size} of {expected['size']} bytes)"
    if size != expected["size"]:
        return f"has {size} bytes, {expected['size']} were written"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != expected["sha256"]:
        return "was altered (its SHA-256 differs from the one recorded when it was written)"
    return None


def verify_checkpoint(checkpoint: Path, *, rank: int = 0, world: int = 1) -> FileCheck:
    """Check ``checkpoint``'s files against its marker: ``rank``'s share of them when ``world`` ranks split the
    work (by size), all of them by default."""
    try:
        marker = read_marker(checkpoint)
    except (OSError, ValueError, TypeError, KeyError) as e:
        return FileCheck(problems=[FileProblem(checkpoint / MARKER, False,
                                               f"cannot be read ({type(e).__name__}: {e})")])
    files = listed_files(checkpoint, marker)
    return check_files(checkpoint, {name: files[name] for name in _share(files, rank, world)})


def listed_files(checkpoint: Path, marker: Marker | None) -> dict[str, dict | None]:
    """The marker's file records, or for a marker without them every file in the folder (unrecorded)."""
    if marker is not None and marker.files is not None:
        return marker.files
    return {p.relative_to(checkpoint).as_posix(): None for p in sorted(checkpoint.rglob("*"))
            if p.is_file() and p.name != MARKER}


def _share(files: dict[str, dict | None], rank: int, world: int) -> list[str]:
    """The files ``rank`` checks: largest first, each to the rank with the fewest bytes so far."""
    load = [0] * world
    mine = []
    for name in sorted(files, key=lambda n: (-(files[n] or {}).get("size", 0), n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += (files[name] or {}).get("size", 0) or 1
        if r == rank:
            mine.append(name)
    return mine


def problem_line(checkpoint: Path, problems: list[FileProblem]) -> str:
    """One line for the first of ``problems`` (refusals sort first) found in ``checkpoint``."""
    first = problems[0]
    if first.refused:
        return (f"checkpoint file {first.path} {first.detail}, outside the allow-list of classes a checkpoint may "
                "hold (ALLOWED_GLOBALS in ratplus_mega/checkpoint/trust.py); nothing was loaded. If the file was "
                f"altered, move {checkpoint} out of {checkpoint.parent} to use the checkpoint before it")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"checkpoint {checkpoint} is damaged: {first.path.name} {first.detail}{more}; `ratplus verify "
            f"{checkpoint.parent}` lists the checkpoints that verify")
