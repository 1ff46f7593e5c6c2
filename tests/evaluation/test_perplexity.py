"""``ratplus eval --tasks ppl`` on a training run equals the validation losses the trainer logged for the same
split, dense and under each validated pattern (the trainer used its own sharded model and reader)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ratplus_mega.cli import main
from ratplus_mega.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def test_ppl_equals_the_trainers_validation_loss(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ratplus_mega.cli", "train", "--config", "configs/train/tiny-cpu.yaml",
           f"data.train=[{tiny_shards}/train]", f"data.val={tiny_shards}/val", f"train.out_dir={run}",
           "train.train_tokens=2048", "train.eval_tokens=2048", "data.num_workers=0", "train.precision=fp32",
           f"data.tokenizer={tiny_shards.parent / 'tok.model'}",
           "train.eval_patterns=[{dilation: 4, window: 8, sinks: 2}]"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "RATPLUS_DISABLE_KERNELS": "1",
           "PATH": __import__("os").environ["PATH"]}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [logged] = read_metrics(run, "val")
    assert main(["eval", "--model", str(run), "--tasks", "ppl", "--patterns", "dense,own,4:8:2",
                 "--eval-tokens", "2048", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    got = {r["pattern"]: r for r in rows}
    assert set(got) == {"dense", "D8-W0-P0", "D4-W8-P2"}
    for name, row in got.items():
        assert row["loss"] == pytest.approx(logged[f"val/loss_{name}"], abs=1e-5)
        assert row["tokens"] == logged[f"val/tokens_{name}"]
