"""Helpers of the reliability tests: ``ratplus`` run as a user runs it (a subprocess, no warnings filter of
ours), checksums of a folder, one short training run shared by the tests that need a run or an HF folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runs import free_port

REPO = Path(__file__).resolve().parents[2]
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _ratplus(*args, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and k != "PYTHONWARNINGS"}
    base.update(OMP_NUM_THREADS="1", RATPLUS_DISABLE_KERNELS="1", MASTER_PORT=str(free_port()))
    base.pop("RATPLUS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ratplus_mega.cli", *map(str, args)], cwd=REPO,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def ratplus():
    """``ratplus(*args, env=None)``: the command in a fresh process (stdin closed, so a prompt cannot wait),
    one rank, one thread; returns the CompletedProcess."""
    return _ratplus


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(proc, command, *fragments)``: exit status 2 and stderr exactly one line,
    ``ratplus <command>: error: ...`` holding every fragment, no traceback."""
    def check(proc, command: str, *fragments: str) -> str:
        err = proc.stderr.strip()
        assert proc.returncode == 2, (proc.returncode, err[-3000:])
        assert len(err.splitlines()) == 1 and err.startswith(f"ratplus {command}: error: "), err[-3000:]
        for fragment in fragments:
            assert fragment in err, (fragment, err)
        return err
    return check


def _digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (folders as "dir"); {} if ``root`` is absent."""
    out = {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    for path in sorted(root.rglob("*")) if root.exists() else []:
        out[str(path.relative_to(root))] = ("dir" if path.is_dir() else
                                            hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="session")
def digest():
    """``digest(path)``: checksums of a file or of every file under a folder, to compare before and after."""
    return _digest


def train_args(shards: Path, out: Path, *extra) -> list[str]:
    """``ratplus train`` of the tiny preset on the shared shards: 1024-token steps, a checkpoint every step."""
    return ["train", "--config", "configs/train/tiny-cpu.yaml", f"data.train=[{shards}/train]",
            f"data.val={shards}/val", f"train.out_dir={out}", "train.train_tokens=2048", "train.log_interval=1",
            "train.save_interval=1", "train.eval_interval=1000", "train.eval_tokens=2048", "data.num_workers=0",
            *extra]


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory):
    """A two-step joint pretraining run whose config names no tokenizer (checkpoints at steps 1 and 2).
    Tests copy it before they write into it."""
    out = tmp_path_factory.mktemp("reliability-run") / "run"
    proc = _ratplus(*train_args(tiny_shards, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "train.stderr").write_text(proc.stderr)  # the quiet-console test reads it
    return out


@pytest.fixture(scope="session")
def tiny_hf(tiny_run, tiny_shards, tmp_path_factory):
    """``tiny_run`` exported to an fp32 HF folder with the shards' tokenizer."""
    out = tmp_path_factory.mktemp("reliability-hf") / "hf"
    proc = _ratplus("export-hf", "--checkpoint", tiny_run, "--out", out, "--dtype", "fp32", "--tokenizer",
                    tiny_shards.parent / "tok.model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
