"""``ratplus info`` run as a user would, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ratplus_mega.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_info_prints_parameters():
    res = run_cli("info", "--config", "configs/model/ratplus-1.5b.yaml", "--pattern", "16,256,4")
    assert res.returncode == 0, res.stderr
    assert "parameters: 1474922496" in res.stdout.splitlines()
    assert "D16-W256-P4" in res.stdout


def test_info_bad_override_is_one_line_exit_2():
    res = run_cli("info", "--config", "configs/model/ratplus-1.5b.yaml", "model.hidden_size=100")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ratplus info: error:") and "model.hidden_size" in lines[0]
    assert "Traceback" not in res.stderr


def test_info_imports_neither_megatron_nor_deepspeed(cli_imports):
    code, loaded, err = cli_imports(["info", "--config", "configs/model/tiny.yaml", "--pattern", "8,16,4"],
                                    block=("megatron", "deepspeed"))
    assert code == 0 and loaded == [], err[-2000:]
