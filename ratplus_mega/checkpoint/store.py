"""Committed checkpoints: a crash at any moment leaves either a whole checkpoint or one that is ignored.

Layout of ``ROOT``::

    ROOT/step000001200/          a committed checkpoint (holds COMMITTED.json)
        <DeepSpeed files>        mp_rank_XX_model_states.pt, zero_pp_rank_* optimizer shards
        ratplus_rank00000.pt     per-rank state: our step, data-loader state, RNG states
        config.yaml              the resolved run config
        COMMITTED.json           written last: step, layout, model config
    ROOT/.tmp-step000001300/     a save in progress (or interrupted): never loaded, removed by the next save
    ROOT/latest                  the newest committed tag, for humans and DeepSpeed tools

Protocol (DESIGN.md "Checkpoints"): every rank writes into the temporary tag and fsyncs its files; barrier;
rank 0 writes the marker, renames the folder to its final tag with ``os.replace`` and rewrites ``latest``;
barrier. Resume scans for the newest folder that holds a marker, so ``latest`` is never trusted alone.
Per-rank files hold tensors and plain containers only and load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMMITTED.json"
_TAG = re.compile(r"step(\d{9})")


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def committed_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(_TAG.fullmatch(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = committed_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(engine, root: str | Path, *, step: int, rank_state: dict, marker: dict, config_yaml: str,
                    keep_last: int) -> Path:
    """Collective: save the engine and this rank's ``rank_state`` as committed checkpoint ``step``."""
    root, rank = Path(root), dist.get_rank()
    tag = tag_for(step)
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, tmp / f"ratplus_rank{rank:05d}.pt")
    _fsync_tree(tmp)
    dist.barrier()
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        _write_durably(tmp / MARKER, json.dumps({**marker, "step": step, "time": time.time()}, indent=2))
        final = root / tag
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_durably(root / "latest", tag)
        for old in committed_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def load_rank_state(path: Path) -> dict:
    """This rank's per-rank state of committed checkpoint ``path``."""
    file = path / f"ratplus_rank{dist.get_rank():05d}.pt"
    if not file.is_file():
        raise RuntimeError(f"{path} has no state for rank {dist.get_rank()} ({file.name}): it was written by a "
                           "run with fewer ranks")
    return torch.load(file, weights_only=True)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
