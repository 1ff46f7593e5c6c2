"""Helpers of the checkpoint reliability tests: a copy of the shared run to damage, a payload to plant in a
file, and the damages a checkpoint file can suffer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIMIZER_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK_STATE = "ratplus_rank00000.pt"
FILE_KINDS = {"model-states": MODEL_STATES, "optimizer-states": OPTIMIZER_STATES, "rank-state": RANK_STATE}


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of the session's shared run (checkpoints at steps 1 and 2) that a test may damage."""
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:09d}"


class Payload:
    """Unpickled in full, it runs code: it writes ``marker``, as an attacker's code would do anything else."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the payload ran')",)


def plant(path: Path, marker: Path, **save_kwargs) -> None:
    """Add a :class:`Payload` to the dict ``torch.save`` file ``path`` (read weights-only), in place."""
    from ratplus_mega.checkpoint.trust import safe_load

    obj = safe_load(path) if path.exists() else {}
    obj["payload"] = Payload(marker)
    torch.save(obj, path, **save_kwargs)


def truncate(path: Path) -> None:
    """Cut ``path`` to half its size (a copy or a write interrupted)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def alter(path: Path) -> None:
    """Flip one byte in the middle of ``path``, keeping its size (a bit rot, or a file edited in place)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def set_run_id(checkpoint_dir: Path, run_id: str) -> None:
    """Rewrite the run id in a checkpoint's marker (as if another run, or an older version, had written it)."""
    marker = checkpoint_dir / "COMMITTED.json"
    fields = json.loads(marker.read_text())
    fields["run_id"] = run_id
    marker.write_text(json.dumps(fields, indent=2))
