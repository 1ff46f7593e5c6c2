"""The launchers as a cluster runs them: the real ``deepspeed`` launcher over a localhost hostfile."""

import subprocess
import sys
from pathlib import Path

import pytest

from ratplus_mega.checkpoint import latest_checkpoint, read_marker

from .test_train import REPO, _env, _port_env, _train_cmd


@pytest.mark.slow
@pytest.mark.multiproc
def test_deepspeed_launcher_trains_two_ranks_to_a_committed_checkpoint(tiny_shards, tmp_path):
    """``launch/train_deepspeed_multinode.sh`` with a one-host hostfile of 2 slots (CPU accelerator): the
    launcher passes ``--local_rank`` before the subcommand, and both ranks train to a committed checkpoint."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    overrides = _train_cmd(tiny_shards, tmp_path / "run", "train.train_tokens=2048", "data.val=null")[6:]
    env = {**_env(), **_port_env(), "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1",
           "RATPLUS_VENV": str(Path(sys.executable).parents[1])}
    proc = subprocess.run(["bash", "launch/train_deepspeed_multinode.sh", "configs/train/tiny-cpu.yaml", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and read_marker(checkpoint).layout["dp"] == 2
