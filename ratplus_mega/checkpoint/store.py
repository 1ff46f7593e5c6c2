"""Committed checkpoints: a crash at any moment leaves either a whole checkpoint or one that is ignored.

Layout of ``ROOT``::

    ROOT/step000001200/          a committed checkpoint (holds COMMITTED.json)
        <DeepSpeed files>        mp_rank_XX_model_states.pt, zero_pp_rank_* optimizer shards
        ratplus_rank00000.pt     per-rank state: our step, data-loader state, RNG states
        config.yaml              the resolved run config
        COMMITTED.json           written last: step, layout, model config
    ROOT/.tmp-step000001300/     a save in progress (or interrupted): never loaded, removed by the next save
    ROOT/latest                  the newest committed tag, for humans and DeepSpeed tools

Protocol: every rank writes into the temporary tag, hashing each file as it writes it, and fsyncs the files
it wrote (and their folder), never another rank's: syncs grow with the rank count, not its square; the ranks'
file lists meet on rank 0 (an all-gather, so every rank has synced before rank 0 goes on); rank 0 writes the
marker (step, layout, model, run id, each file's size and SHA-256), renames the folder to its final tag with
``os.replace``, rewrites ``latest`` and prunes its own run's old checkpoints; barrier. Resume scans for the
newest folder that holds a marker, so ``latest`` is never trusted alone, and verifies it (spread over the ranks)
before DeepSpeed opens a file: a damaged one is set aside and the next older one tried, a file naming a class
outside the allow-list (``trust.py``) stops the run. A checkpoint of another layout is re-cut (``relayout.py``).
Nothing is ever deleted but the run's own checkpoints beyond ``train.keep_last``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..config.load import dump_config
from ..config.schema import RunConfig
from ..durable import fsync_dir, fsync_files, write_text_durably
from ..errors import RatplusError
from .integrity import (FileCheck, FileProblem, install_recording_engine, listed_files, problem_line, save_recorded,
                        verify_checkpoint, write_text_recorded)
from .marker import (CONFIG, MARKER, Marker, check_resumable, marker_json, model_fingerprint, read_marker,
                     run_config)
from .relayout import SavedTrainingState, place_training_state, relayout_refusal
from .trust import restricted_loads, safe_load

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


def step_of(checkpoint: Path) -> int:
    """The step a checkpoint folder's name (``step000001200``, or one set aside: ``step000001200.damaged-...``)
    says it holds."""
    return int(_TAG.match(Path(checkpoint).name).group(1))


def new_run_id() -> str:
    """Collective: a fresh run id (time and random digits), the same on every rank."""
    drawn = [f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"]
    dist.broadcast_object_list(drawn, src=0)
    return drawn[0]


def set_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to a sibling ``<name>.<why>-<time>`` (never deleted; no longer committed or resumed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{why}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{why}-{stamp}-{n}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def save_checkpoint(engine, root: str | Path, *, step: int, rank_state: dict, run: RunConfig,
                    layout: dict[str, int], run_id: str) -> Path:
    """Collective: save the engine and this rank's ``rank_state`` as committed checkpoint ``step`` of ``run``
    (laid out as ``layout``) written by run ``run_id``, keeping that run's newest ``run.train.keep_last``."""
    root, rank = Path(root), dist.get_rank()
    tag = tag_for(step)
    tmp = root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    recorder = install_recording_engine(engine)
    recorder.written.clear()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False)
    tmp.mkdir(parents=True, exist_ok=True)
    written = {_relative(path, tmp): record for path, record in recorder.written.items()}
    written[_rank_file(rank)] = save_recorded(rank_state, tmp / _rank_file(rank))
    fsync_files(tmp / name for name in written)
    every_rank: list[dict] = [{} for _ in range(dist.get_world_size())]
    # Also the barrier before the marker: every rank's files are on disk once it returns anywhere.
    dist.all_gather_object(every_rank, written)
    if rank == 0:
        files = {name: record for ranks_files in every_rank for name, record in ranks_files.items()}
        files[CONFIG] = write_text_recorded(tmp / CONFIG, dump_config(run))
        marker = Marker(step=step, layout=layout, model=model_fingerprint(run.model), time=time.time(),
                        run_id=run_id, files=dict(sorted(files.items())))
        write_text_durably(tmp / MARKER, marker_json(marker))
        final = root / tag
        if final.exists():  # a checkpoint of this step that the run did not resume from: kept, renamed
            set_aside(final, "replaced")
        os.replace(tmp, final)
        fsync_dir(root)
        write_text_durably(root / "latest", tag)
        own = [c for c in committed_checkpoints(root) if _run_id(c) == run_id]
        for old in own[:-run.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def checkpoint_bytes(checkpoint: Path) -> int:
    """Bytes of committed ``checkpoint``: every file its marker lists, and the marker (its own folder listed
    when the marker records no files)."""
    files = listed_files(checkpoint, read_marker(checkpoint))
    sizes = [record["size"] if record else (checkpoint / name).stat().st_size for name, record in files.items()]
    return sum(sizes) + (checkpoint / MARKER).stat().st_size


def resume_checkpoint(engine, checkpoint: Path, *, run: RunConfig, layout: dict[str, int]) -> dict:
    """Load committed ``checkpoint`` into ``engine`` (weights, optimizer) after checking that ``run`` laid out as
    ``layout`` may continue it; returns this rank's state (``step``, ``data``, ``rng``). Every file is loaded
    weights-only with the allow-list (verify it first: :func:`select_resume_checkpoint`).

    A checkpoint of another (tp, pp, dp) layout is re-cut when both sides run ZeRO-1 or ZeRO-2 without context
    parallelism (``relayout.py``); otherwise ValueError, one line naming the checkpoint and both layouts."""
    marker = check_resumable(checkpoint, model=run.model)
    install_recording_engine(engine)
    if marker.layout == layout:
        with restricted_loads():
            engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_lr_scheduler_states=False)
        return load_rank_state(checkpoint)
    saved_zero = run_config(checkpoint).parallel.zero_stage
    refusal = relayout_refusal(checkpoint, saved=marker.layout, saved_zero=saved_zero, layout=layout,
                               zero=run.parallel.zero_stage)
    if refusal:
        raise ValueError(refusal)
    place_training_state(engine, SavedTrainingState(checkpoint, run.model, tp=marker.layout["tp"]))
    if dist.get_rank() == 0:
        print(f"{checkpoint} was written with layout {marker.layout}, this run is {layout}: its weights and "
              "optimizer state were re-cut for this layout", flush=True)
    return _state_for_another_layout(checkpoint)


def load_module_weights(engine, checkpoint: Path, *, key: str = "train.init_from") -> None:
    """Collective: only the weights of committed ``checkpoint`` into ``engine`` (same TP/PP cut; the optimizer
    stays fresh), after its files verify; RatplusError naming ``key`` and the first bad file otherwise."""
    problems = _verify_collectively(checkpoint).problems
    if problems:
        raise RatplusError(f"{key}: {problem_line(checkpoint, problems)}")
    install_recording_engine(engine)
    with restricted_loads():
        engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_only=True,
                               load_optimizer_states=False, load_lr_scheduler_states=False)


def load_rank_state(path: Path) -> dict:
    """This rank's per-rank state of committed checkpoint ``path`` (weights-only, allow-list)."""
    file = path / _rank_file(dist.get_rank())
    if not file.is_file():
        raise RuntimeError(f"{path} has no state for rank {dist.get_rank()} ({file.name}): it was written by a "
                           "run with fewer ranks")
    return safe_load(file)


def _state_for_another_layout(checkpoint: Path) -> dict:
    """This rank's state from a checkpoint of another layout. The step and the data position are the same on every
    rank that reads data, rank 0 among them (the loader counts samples over all DP ranks, so a new DP size
    resumes at the same sample); the RNG states are this rank's where the checkpoint has its file, else rank
    0's (training draws no random numbers: no dropout, the loader has its own seeds)."""
    first = safe_load(checkpoint / _rank_file(0))
    own = checkpoint / _rank_file(dist.get_rank())
    rng = safe_load(own)["rng"] if own.is_file() else first["rng"]
    return {"step": first["step"], "data": first["data"], "rng": rng}


def select_resume_checkpoint(root: str | Path) -> Path | None:
    """Collective: the newest committed checkpoint under ``root`` whose files verify (None if there is none).

    Newer ones that do not verify (a file missing, truncated or altered) are named in a warning and set aside
    (renamed ``<tag>.damaged-<time>``, never deleted). Raises RatplusError, in one line, when a file names a
    class outside the allow-list (nothing is loaded), or when checkpoints exist and none verifies."""
    root = Path(root)
    damaged: list[tuple[Path, list[FileProblem]]] = []
    chosen = None
    for checkpoint in reversed(committed_checkpoints(root)):
        problems = _verify_collectively(checkpoint).problems
        if any(p.refused for p in problems):
            raise RatplusError(problem_line(checkpoint, problems))
        if not problems:
            chosen = checkpoint
            break
        damaged.append((checkpoint, problems))
    if chosen is None and damaged:
        listed = "; ".join(f"{c.name}: {problems[0].line()}" for c, problems in damaged)
        raise RatplusError(f"no checkpoint under {root} verifies ({listed}): restore the files from a copy, or "
                           "start afresh with a new train.out_dir (or train.resume=never train.overwrite=true, "
                           "which moves these aside)")
    if dist.get_rank() == 0:
        for checkpoint, problems in damaged:
            aside = set_aside(checkpoint, "damaged")
            print(f"warning: checkpoint {checkpoint} does not verify: {'; '.join(p.line() for p in problems)}; "
                  f"set aside as {aside.name}, resuming from {chosen}", file=sys.stderr, flush=True)
    dist.barrier()
    return chosen


@dataclass
class CheckpointReport:
    """What :func:`verify_checkpoints` found for one committed checkpoint."""

    path: Path
    step: int
    layout: dict[str, int] | None
    run_id: str | None
    files: int
    recorded: bool
    """The marker lists each file's size and SHA-256 (checkpoints written before that are only scanned)."""
    problems: list[FileProblem]


def verify_checkpoints(path: str | Path) -> tuple[Path, list[CheckpointReport]]:
    """One process: ``(root, reports)`` for every committed checkpoint of a run folder, its ``checkpoints``
    folder or one checkpoint folder, oldest first. RatplusError when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        root, found = path.parent, [path]
    else:
        root = path / "checkpoints" if committed_checkpoints(path / "checkpoints") else path
        found = committed_checkpoints(root)
    if not found:
        raise RatplusError(f"{path}: no committed checkpoint there (a run folder, its checkpoints folder, or a "
                           f"folder holding {MARKER})")
    reports = []
    for checkpoint in found:
        check = verify_checkpoint(checkpoint)
        try:
            marker = read_marker(checkpoint)
        except (OSError, ValueError, TypeError, KeyError):
            marker = None
        reports.append(CheckpointReport(
            path=checkpoint, step=step_of(checkpoint), layout=marker.layout if marker else None,
            run_id=marker.run_id if marker else None, files=len(listed_files(checkpoint, marker)),
            recorded=bool(marker and marker.files is not None), problems=check.problems))
    return root, reports


def _verify_collectively(checkpoint: Path) -> FileCheck:
    """Collective: ``checkpoint``'s files checked, spread over the ranks; every rank gets every finding."""
    mine = verify_checkpoint(checkpoint, rank=dist.get_rank(), world=dist.get_world_size())
    every_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, (mine.problems, mine.globals_found))
    check = FileCheck()
    for problems, found in every_rank:
        check.problems.extend(problems)
        check.globals_found.update(found)
    check.problems.sort(key=lambda p: (not p.refused, str(p.path)))  # refusals first, as check_files sorts
    return check


def _run_id(checkpoint: Path) -> str | None:
    try:
        return read_marker(checkpoint).run_id
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _relative(path: str, folder: Path) -> str:
    relative = Path(os.path.relpath(path, os.path.abspath(folder)))
    if relative.parts and relative.parts[0] == "..":
        raise RuntimeError(f"DeepSpeed wrote {path} outside the checkpoint folder {folder}")
    return relative.as_posix()


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
