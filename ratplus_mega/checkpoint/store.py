"""Committed checkpoints: a crash at any moment leaves either a whole checkpoint or one that is ignored.

Layout of ``ROOT``::

    ROOT/step000001200/          a committed checkpoint (holds COMMITTED.json)
        <DeepSpeed files>        mp_rank_XX_model_states.pt, zero_pp_rank_* optimizer shards
        ratplus_rank00000.pt     per-rank state: our step, data-loader state, RNG states
        config.yaml              the resolved run config
        COMMITTED.json           written last: step, layout, model config
    ROOT/.tmp-step000001300/     a save in progress (or interrupted): never loaded, removed by the next save
    ROOT/latest                  the newest committed tag, for humans and DeepSpeed tools

Protocol: every rank writes into the temporary tag and fsyncs its files; barrier;
rank 0 writes the marker, renames the folder to its final tag with ``os.replace`` and rewrites ``latest``;
barrier. Resume scans for the newest folder that holds a marker, so ``latest`` is never trusted alone.
Per-rank files hold tensors and plain containers only and load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config.load import dump_config
from ..config.schema import RunConfig
from ..durable import fsync_dir, fsync_tree, write_text_durably
from .marker import CONFIG, MARKER, Marker, check_resumable, marker_json, model_fingerprint

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


def save_checkpoint(engine, root: str | Path, *, step: int, rank_state: dict, run: RunConfig,
                    layout: dict[str, int]) -> Path:
    """Collective: save the engine and this rank's ``rank_state`` as committed checkpoint ``step`` of ``run``
    (laid out as ``layout``), keeping the newest ``run.train.keep_last``."""
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
    torch.save(rank_state, tmp / _rank_file(rank))
    fsync_tree(tmp)
    dist.barrier()
    if rank == 0:
        (tmp / CONFIG).write_text(dump_config(run))
        marker = Marker(step=step, layout=layout, model=model_fingerprint(run.model), time=time.time())
        write_text_durably(tmp / MARKER, marker_json(marker))
        final = root / tag
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        write_text_durably(root / "latest", tag)
        for old in committed_checkpoints(root)[:-run.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def resume_checkpoint(engine, checkpoint: Path, *, run: RunConfig, layout: dict[str, int]) -> dict:
    """Load committed ``checkpoint`` into ``engine`` (weights, optimizer) after checking that ``run`` laid out as
    ``layout`` may continue it; returns this rank's state (``step``, ``data``, ``rng``)."""
    check_resumable(checkpoint, layout=layout, model=run.model)
    engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_lr_scheduler_states=False)
    return load_rank_state(checkpoint)


def load_module_weights(engine, checkpoint: Path) -> None:
    """Only the weights of committed ``checkpoint`` into ``engine`` (same TP/PP cut; the optimizer stays fresh)."""
    engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)


def load_rank_state(path: Path) -> dict:
    """This rank's per-rank state of committed checkpoint ``path``."""
    file = path / _rank_file(dist.get_rank())
    if not file.is_file():
        raise RuntimeError(f"{path} has no state for rank {dist.get_rank()} ({file.name}): it was written by a "
                           "run with fewer ranks")
    return torch.load(file, weights_only=True)


def resolve_checkpoint(path: str | Path, *, key: str) -> Path:
    """A committed checkpoint folder, or the newest one under a run's ``checkpoints`` folder or run folder;
    ValueError naming ``key`` (the option or config key that gave ``path``) when there is none."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / MARKER).is_file():
            return candidate
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise ValueError(f"{key} {path}: no committed checkpoint there (a folder holding {MARKER}, or a run's "
                     "checkpoints folder)")


def _rank_file(rank: int) -> str:
    return f"ratplus_rank{rank:05d}.pt"
