"""Helpers of the end-to-end tests that start ``ratplus train`` as a user would: the command, a clean
environment, a free port, torchrun, and the losses printed per step."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEP = re.compile(r"^step (\d+)/\d+ (.*?) lr ")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (each run starts afresh), single-threaded."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RATPLUS_DISABLE_KERNELS": "1", **extra}


def train_args(shards: Path | str, out: Path, *extra: str, val: bool = False) -> list[str]:
    """``ratplus train`` arguments of a few steps of the tiny preset on ``shards`` (a ``prep shards`` folder or
    a URL): 4 steps unless ``train.train_tokens`` is overridden, a checkpoint every 2 steps."""
    return ["train", "--config", "configs/train/tiny-cpu.yaml", f"data.train=[{shards}/train]",
            f"data.val={shards}/val" if val else "data.val=null", f"train.out_dir={out}", "train.train_tokens=4096",
            "train.log_interval=1", "train.save_interval=2", "train.eval_interval=1000", "train.eval_tokens=2048",
            "data.num_workers=0", "train.adam_eps=1e-6", *extra]


def ratplus(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ratplus_mega.cli", *args]


def torchrun(args: list[str], *, port: int, nproc: int = 1, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "ratplus_mega.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def losses(text: str) -> dict[int, str]:
    """Step -> the losses as printed (the text between ``step N/M`` and ``lr``); a step printed twice (redone
    after a resume) keeps the last."""
    return {int(m.group(1)): m.group(2) for line in text.splitlines() if (m := STEP.match(line))}


def numbers(text: str) -> list[float]:
    """The decimal numbers of a printed losses text."""
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


def error_lines(stderr: str) -> list[str]:
    """The ``ratplus <command>: error: ...`` lines of a run's stderr."""
    return [line for line in stderr.splitlines() if re.match(r"^ratplus [\w ]+: error: ", line)]
