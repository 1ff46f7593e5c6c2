"""The commit protocol at more than one rank: each rank syncs only the files it wrote (syncs grow with the
rank count, not its square), and the marker is written only once every rank's files are synced."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ratplus_mega.checkpoint import MARKER, read_marker
from tests.e2e.runs import free_port

WORKER = Path(__file__).with_name("commit_worker.py")
REPO = Path(__file__).resolve().parents[2]


def _synced(log: Path) -> list[tuple[int, str]]:
    return [(int(rank), path) for rank, path in (line.split("\t") for line in log.read_text().splitlines())]


@pytest.mark.multiproc
def test_each_rank_syncs_its_own_files_and_the_marker_follows_all(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RATPLUS_DISABLE_KERNELS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    checkpoint = Path(ranks[0]["checkpoint"])
    tmp_name = f".tmp-{checkpoint.name}"
    rank_files = [set(r["written"]) for r in ranks]
    assert not rank_files[0] & rank_files[1]
    assert rank_files[0] | rank_files[1] | {"config.yaml"} == set(read_marker(checkpoint).files)

    def checkpoint_files(entries, rank):  # the files of the checkpoint in progress ``rank`` synced
        return [Path(p).name for r, p in entries if r == rank and Path(p).parent.name == tmp_name]

    synced = _synced(tmp_path / "fsync.log")
    for rank in (0, 1):
        mine = checkpoint_files(synced, rank)
        # Rank 0 also writes config.yaml and the marker (through a temporary file named after it).
        others = {n for n in mine if n == "config.yaml" or n.startswith(MARKER)} if rank == 0 else set()
        assert set(mine) <= rank_files[rank] | others, (rank, mine)
        assert sorted(mine) == sorted(set(mine)), (rank, mine)  # each file once
        assert rank_files[rank] <= set(mine), (rank, mine)

    before_marker = _synced(tmp_path / "at_marker.log")
    for rank in (0, 1):
        assert rank_files[rank] <= set(checkpoint_files(before_marker, rank)), rank
