"""The quickstart pipeline end to end at its smallest setting."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.multiproc
def test_quickstart_runs_every_stage(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ratplus_mega.cli", "quickstart", "--out", str(tmp_path / "qs"),
                           "--documents", "400", "--pretrain-steps", "10", "--adapt-steps", "5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "qs"
    for artefact in ("tokenizer.model", "shards/manifest.json", "loss_curves.png", "hf/config.json",
                     "hf/model.safetensors", "hf/tokenizer.model", "adapt/checkpoints/latest"):
        assert (out / artefact).exists(), artefact
    assert "recall dense" in proc.stdout and "D8-W16-P4" in proc.stdout
    assert "sample with the compressed sparse cache" in proc.stdout
